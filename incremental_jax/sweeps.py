"""Sweeps: several configs of one experiment, trained by one command into one workdir (`config.sweep`).

A sweep is a spec string (big_vision's product/zip of config overrides, written as text so that it is one config
field and one command-line flag):

    SPEC  := TERM ( '*' TERM )*          product of the terms (the rightmost varies fastest, as nested loops)
    TERM  := AXIS ( '+' AXIS )*          zip: axes of one length, taken together
    AXIS  := FIELD '=' VALUE ( ',' VALUE )*

e.g. `optim.lr=0.05,0.1 * method.lambda_base=2,5 * seed=0,1` (8 runs), or
`data.increment=10,5 + optim.epochs=160,100 * data.named_order=podnet_cifar100:0,podnet_cifar100:1` (4 runs).
FIELD is any config field by its dotted path (`seed`, `optim.lr`, `method.aux_losses.bake.weight`); each VALUE is
parsed by the type of the field's current value (int, float, bool as true/false, str as written or quoted, tuple
as `(80,120)`; commas inside parentheses or quotes do not separate values). Presets write the spec with `axis`,
`product` and `zipped`, or as the string itself.

Each run is the config with its overrides (and `sweep` emptied), trained into the subfolder named after them
(`run_name`: `lr=0.05,lambda_base=2,seed=0`), exactly what that config alone would write. Runs that differ only
in their seed and class order (`REPEAT_FIELDS`, and with item 2 the method's traced hyperparameters) are trained
together as one vmapped group (`train_groups`), other groups one after another. `summary.json` (`summarize`) holds
every run's numbers and, per setting (the runs that share every override but their seed and order), the mean and
std over its runs.

A sweep may also carry the paper table it reproduces (`config.reference_table`, a `PaperTable` of its config module's
`TABLES`), which `incremental_jax.report` prints beside ours.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import importlib
import json
import re
from typing import Any, Optional, Sequence

import numpy as np

from incremental_jax.errors import ConfigError
from incremental_jax.registry import close_matches

# Fields that repeat one setting (its mean and std are over them): the seed and the class order.
REPEAT_FIELDS = ('seed', 'data.class_order_seed', 'data.named_order', 'data.class_order', 'run')
# Fields a sweep may not set (they are the sweep's own, or name a group of runs).
UNSWEPT = ('sweep', 'num_runs', 'runs_vary', 'reference_table')
SUMMARY_KEYS = ('avg_incremental_accuracy', 'last_accuracy', 'average_forgetting')


# ---- writing a spec --------------------------------------------------------------------------------------
def render_value(value) -> str:
  """A value as the spec writes it (tuples in parentheses, strings as they are)."""
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, (tuple, list)):
    return '(' + ','.join(render_value(v) for v in value) + (',)' if len(value) == 1 else ')')
  if isinstance(value, float):
    text = repr(value)
    return text[:-2] if text.endswith('.0') else text
  return str(value)


def axis(field: str, values: Sequence) -> str:
  """`field=v1,v2,...`: one axis of a sweep."""
  return f'{field}=' + ','.join(render_value(v) for v in values)


def zipped(*axes: str) -> str:
  """The axes taken together (one run per position; the axes have one length)."""
  return ' + '.join(axes)


def product(*terms: str) -> str:
  """Every combination of the terms (axes or `zipped` axes), the last varying fastest."""
  return ' * '.join(terms)


# ---- reading a spec --------------------------------------------------------------------------------------
def _split_top(text: str, seps: str) -> list:
  """`text` split at the characters of `seps` outside parentheses, brackets and quotes; a '+' of a number's
  exponent (1e+3) does not split."""
  parts, depth, quote, start = [], 0, None, 0
  for i, ch in enumerate(text):
    if quote:
      quote = None if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch in '([':
      depth += 1
    elif ch in ')]':
      depth -= 1
    elif depth == 0 and ch in seps and not (ch == '+' and re.search(r'[0-9.][eE]$', text[start:i])):
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return parts


def _field_value(config, field: str):
  """The current value of the dotted `field` of `config`; ConfigError naming close matches when it has none."""
  node, path = config, []
  for name in field.split('.'):
    keys = list(node.keys()) if hasattr(node, 'keys') else []
    if name not in keys:
      where = '.'.join(path) or 'the config'
      candidates = ['.'.join(path + [k]) for k in keys]
      matches = close_matches(field, candidates) or close_matches(name, keys)
      hint = f' Close: {", ".join(matches)}.' if matches else ''
      raise ConfigError(f'sweep: {where} has no field {name!r} ({field!r}).{hint}')
    node, path = node[name], path + [name]
  if hasattr(node, 'keys'):
    raise ConfigError(f'sweep: {field!r} is a section; sweep one of its fields ({", ".join(sorted(node.keys()))}).')
  return node


def parse_value(text: str, current, field: str):
  """`text` as a value of the type of `current` (the field's value in the config)."""
  s = text.strip()
  unquoted = s[1:-1] if len(s) >= 2 and s[0] == s[-1] and s[0] in '\'"' else s
  try:
    if isinstance(current, bool):
      low = unquoted.lower()
      if low not in ('true', 'false', '1', '0'):
        raise ValueError
      return low in ('true', '1')
    if isinstance(current, int):
      return int(unquoted)
    if isinstance(current, float):
      return float(unquoted)
    if isinstance(current, str):
      return unquoted
    if isinstance(current, (tuple, list)):
      value = ast.literal_eval(s) if s else ()
      if not isinstance(value, (tuple, list)):
        value = (value,)
      return tuple(value)
    return ast.literal_eval(s)
  except (ValueError, SyntaxError):
    kind = 'true/false' if isinstance(current, bool) else type(current).__name__
    raise ConfigError(f'sweep: {field}={s!r} is not a valid {kind} (the field holds {current!r}).') from None


def parse(spec: str, config) -> list:
  """The runs of `spec` over `config`: a list of {field: value} overrides, in sweep order (the product's last
  term fastest). Raises ConfigError (one line) for a malformed spec, an unknown field or an unparsable value."""
  spec = (spec or '').strip()
  if not spec:
    return []
  runs = [{}]
  for term in _split_top(spec, '*'):
    columns = []
    for ax in _split_top(term, '+'):
      field, eq, values = ax.partition('=')
      field = field.strip()
      if not eq or not field or not values.strip():
        raise ConfigError(f"sweep: {ax.strip()!r} is not FIELD=VALUE[,VALUE...] (spec {spec!r}).")
      if field in UNSWEPT:
        raise ConfigError(f'sweep: {field} cannot be swept (spec {spec!r}).')
      current = _field_value(config, field)
      columns.append([(field, parse_value(v, current, field)) for v in _split_top(values, ',')])
    lengths = {len(c) for c in columns}
    if len(lengths) > 1:
      raise ConfigError(f"sweep: zipped axes ('+') need one length; {term.strip()!r} has "
                        f'{", ".join(str(len(c)) for c in columns)} values.')
    fields = [c[0][0] for c in columns]
    taken = {f for r in runs[:1] for f in r}
    if len(set(fields)) < len(fields) or taken & set(fields):
      raise ConfigError(f'sweep: a field appears twice in {spec!r}.')
    points = [dict(values) for values in zip(*columns)]
    runs = [{**r, **p} for r in runs for p in points]
  return runs


def apply_overrides(config, overrides: dict):
  """`config` with `overrides` set (a copy; references between fields follow, e.g. `data.same_class_per_anchor`),
  its `sweep` emptied: the config of one run."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.sweep = ''
    for field, value in overrides.items():
      *sections, name = field.split('.')
      node = c
      for s in sections:
        node = node[s]
      node[name] = value
  return c.copy_and_resolve_references()


# ---- naming and grouping ---------------------------------------------------------------------------------
def short_names(fields: Sequence[str]) -> dict:
  """{field: its last component}, or the whole dotted path where two fields share a last component."""
  last = [f.split('.')[-1] for f in fields]
  return {f: (s if last.count(s) == 1 else f) for f, s in zip(fields, last)}


def _safe(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9._+=-]', '_', text.replace('(', '').replace(')', '').replace(',', '-'))


def run_name(overrides: dict, names: dict) -> str:
  """The subfolder of a run: `name=value` for each override, joined by ',' (filesystem-safe: characters other than
  letters, digits and `._+=-` become '_'; a tuple's elements are joined by '-')."""
  return ','.join(f'{_safe(names[f])}={_safe(render_value(v))}' for f, v in overrides.items()) or 'run'


def setting_of(overrides: dict) -> dict:
  """The overrides that define a setting: all but the seed and class order (`REPEAT_FIELDS`)."""
  return {f: v for f, v in overrides.items() if f not in REPEAT_FIELDS}


@dataclasses.dataclass(frozen=True)
class SweepRun:
  """One run of a sweep: its subfolder name, its overrides and its config."""
  name: str
  overrides: dict
  config: Any


def sweep_runs(config) -> list:
  """The runs of `config.sweep`, each with `num_runs` repeats when `num_runs` > 1 (repeat k of a point is
  `runs.run_configs`' run k of it, named with `,run=k`). Raises ConfigError before anything trains: a malformed
  spec, two runs of one name."""
  from incremental_jax import runs as runs_lib
  points = parse(config.sweep, config)
  names = short_names(list(dict.fromkeys(f for p in points for f in p)))
  out = []
  for point in points:
    base = apply_overrides(config, point)
    repeats = runs_lib.run_configs(base)
    for k, c in enumerate(repeats):
      overrides = {**point, 'run': k} if len(repeats) > 1 else dict(point)
      out.append(SweepRun(run_name(overrides, {**names, 'run': 'run'}), overrides, c))
  seen = {}
  for r in out:
    if r.name in seen:
      raise ConfigError(f'sweep: runs {seen[r.name]} and {r.overrides} have the same folder name {r.name!r}.')
    seen[r.name] = r.overrides
  return out


def _flat(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


# The optimiser fields the train step reads as traced values (`step.TRACED_OPTIM`, `TaskInfo.hparams`), with the
# first-task overrides that replace them in task 0 (read on the host).
TRACED_OPTIM_FIELDS = ('optim.lr', 'optim.weight_decay', 'optim.momentum', 'optim.gamma', 'optim.milestones',
                       'optim.first_task_lr', 'optim.first_task_weight_decay', 'optim.first_task_milestones')


def traced_fields(config) -> tuple:
  """The fields in which runs trained together may differ besides seed and order: the optimiser's traced ones and
  the method's `hyperparameters` (`methods.base.Method`, also a registered method's)."""
  from incremental_jax.methods import METHODS
  method = METHODS.lookup(config.method.name, 'method.name')
  return TRACED_OPTIM_FIELDS + tuple(f'method.{name}' for name in getattr(method, 'hyperparameters', ()))


def _shape_of(value):
  """What a traced field keeps in the compiled program: a number whether it is 0 (a term with weight 0 may be
  skipped, an override of 0 is none), a tuple its length."""
  return len(value) if isinstance(value, (list, tuple)) else value == 0


def group_key(config, traced: Sequence[str] = ()) -> str:
  """What runs trained together must share: the config but the seed, the class order and the values of the
  `traced` fields (of which only `_shape_of` counts)."""
  skip = set(REPEAT_FIELDS) | {'sweep', 'progress'}
  flat = _flat(json.loads(config.to_json_best_effort()))
  key = {k: (('traced', _shape_of(v)) if k in traced else v) for k, v in sorted(flat.items()) if k not in skip}
  return json.dumps(key, sort_keys=True)


def train_groups(runs: Sequence[SweepRun]) -> list:
  """The runs as groups trained together, one vmapped program for each (lists of indices into `runs`, in order of
  first appearance): runs whose configs agree on everything but the seed, the class order and the values of the
  traced hyperparameters (`traced_fields`)."""
  groups: dict = {}
  for i, r in enumerate(runs):
    groups.setdefault(group_key(r.config, traced_fields(r.config)), []).append(i)
  return list(groups.values())


# ---- summary --------------------------------------------------------------------------------------------
def _stats(values: list) -> Optional[dict]:
  if not values or any(v is None for v in values):
    return None
  return {'mean': float(np.mean(values)), 'std': float(np.std(values)), 'n': len(values)}


def summarize(spec: str, runs: Sequence[SweepRun], results: Sequence[dict], groups: Sequence[dict],
              reference_table: str = '') -> dict:
  """summary.json of a sweep: the spec, every run's numbers, and per setting (runs sharing every override but the
  seed and order) the mean and std (numpy, ddof=0) of each headline number over its runs, with the compilations
  of the group that trained it. `groups`: [{'runs': [run indices], 'compilations': n, ...}] as trained."""
  group_of = {i: g for g in groups for i in g['runs']}
  per_run = []
  for i, (run, res) in enumerate(zip(runs, results)):
    per_run.append({'name': run.name, 'overrides': run.overrides, 'seed': res['config']['seed'],
                    'class_order': res['class_order'], **{k: res.get(k) for k in SUMMARY_KEYS}})
  settings: dict = {}
  for i, run in enumerate(runs):
    key = json.dumps(setting_of(run.overrides), sort_keys=True, default=str)
    settings.setdefault(key, []).append(i)
  names = short_names(list(dict.fromkeys(f for r in runs for f in setting_of(r.overrides))))
  out_settings = []
  for members in settings.values():
    setting = setting_of(runs[members[0]].overrides)
    entry = {'name': run_name(setting, names) if setting else 'all', 'setting': setting,
             'runs': [runs[i].name for i in members]}
    for key in SUMMARY_KEYS:
      for kind in ('cnn', 'nme'):
        stats = _stats([(results[i].get(key) or {}).get(kind) for i in members])
        if stats is not None:
          entry.setdefault(key, {})[kind] = stats
    trained = [group_of[i] for i in members if i in group_of]
    for count in ('compilations', 'subnetwork_compilations'):
      if any(count in g for g in trained):
        entry[count] = sum({id(g): g.get(count, 0) for g in trained}.values())
    out_settings.append(entry)
  first = results[0]
  return {'sweep': spec, 'method': first['method'], 'dataset': first['dataset'], 'num_runs': len(runs),
          'reference_table': reference_table, 'runs': per_run, 'settings': out_settings,
          'train_groups': [{'runs': [runs[i].name for i in g['runs']],
                            **{k: v for k, v in g.items() if k != 'runs'}} for g in groups]}


def format_summary(summary: dict) -> str:
  lines = [f"sweep of {summary['num_runs']} runs of {summary['method']} on {summary['dataset']} "
           f"({len(summary['train_groups'])} trained groups):"]
  for s in summary['settings']:
    parts = []
    for kind, v in (s.get('avg_incremental_accuracy') or {}).items():
      parts.append(f"{kind.upper()} {v['mean']:.2f} +- {v['std']:.2f}")
    lines.append(f"  {s['name']} ({len(s['runs'])} runs): avg inc. " + '   '.join(parts))
  return '\n'.join(lines)


# ---- paper tables --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PaperRow:
  """One setting of a paper's table: `setting` ({field: value} of the sweep overrides that select its runs), the
  paper's `label` for it and its numbers {'cnn': x, 'nme': y} (None where the paper gives none)."""
  setting: dict
  label: str
  values: dict


@dataclasses.dataclass(frozen=True)
class PaperTable:
  """A table of a paper that a sweep preset reproduces: `citation` (paper, table, column, where the numbers were
  read), `metric` (a results.json headline number: 'avg_incremental_accuracy' or 'last_accuracy'), `error` True
  when the paper prints the top-1 error (100 - accuracy) rather than the accuracy, and its `rows`."""
  title: str
  citation: str
  rows: tuple
  metric: str = 'avg_incremental_accuracy'
  error: bool = False
  note: str = ''


def find_table(name: str) -> PaperTable:
  """The `PaperTable` named '<configs module>:<table>' (the module's `TABLES`), e.g. 'podnet:table1_podnet'."""
  module, sep, table = name.partition(':')
  if not sep:
    raise ConfigError(f"reference_table={name!r}: expected '<configs module>:<table>', e.g. 'podnet:table1_podnet'.")
  try:
    tables = importlib.import_module(f'incremental_jax.configs.{module}').TABLES
  except (ImportError, AttributeError):
    raise ConfigError(f'reference_table={name!r}: incremental_jax.configs.{module} has no paper tables (TABLES).'
                      ) from None
  if table not in tables:
    raise ConfigError(f'reference_table={name!r}: {module} has the tables {sorted(tables)}.')
  return tables[table]
