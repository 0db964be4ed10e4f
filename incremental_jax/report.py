"""A comparison report over run workdirs: `python -m incremental_jax.report RUN_DIR... [--out DIR]`.

Each RUN_DIR is a single run (its `results.json`), a `num_runs` group (`summary.json` and `run_k/results.json`) or
a sweep (`summary.json` and one subfolder per run; each of its settings is a row, a group of its runs).
Writes into `--out` (default: the current directory)
  report.md   a Markdown table: method, data set, protocol (base + increments), average incremental CNN / NME
              accuracy, last accuracy and average forgetting (a group: mean ± std over its runs, numpy's std with
              ddof=0 as summary.json), train time, compiled train steps;
  report.csv  the same numbers, one column per mean and std;
  report.png  accuracy on the seen classes against the number of classes (CNN, and NME where a run has it),
              every run a curve, a group its mean with a shaded ±std band;
and prints the Markdown table. Runs of different protocols (data set or task sizes) share no curve: the report
refuses them (one line on stderr, exit status 2) unless `--mix-protocols` is given (a sweep's settings may differ
in protocol: they are its rows).

A sweep that reproduces a paper's table (its summary.json names a `reference_table`, or `--table` names one) gets
the paper's table instead (`paper_report`): one row per setting of the table, ours as mean ± std over the
setting's runs (its class orders or seeds), the paper's number and the difference (ours - paper), CNN and NME, the
citation under it; as paper.md, paper.csv and paper.png (accuracy against the number of classes, one panel per
setting, mean ± std over the runs).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
from typing import Optional, Sequence

import numpy as np

from incremental_jax import paths
from incremental_jax.errors import ReportError
from incremental_jax.startup import protocol

KINDS = ('cnn', 'nme')
METRICS = (('avg_incremental_accuracy', 'avg inc.'), ('last_accuracy', 'last'), ('average_forgetting', 'forgetting'))


@dataclasses.dataclass
class Entry:
  """One RUN_DIR: its runs' results (one for a single run) and, for a group, its summary.json."""
  path: str
  runs: list
  summary: Optional[dict] = None

  @property
  def first(self) -> dict:
    return self.runs[0]

  @property
  def method(self) -> str:
    return self.first['method']

  @property
  def dataset(self) -> str:
    return self.first['dataset']

  @property
  def task_sizes(self) -> tuple:
    return tuple(self.first['task_sizes'])

  @property
  def name(self) -> str:
    return paths.as_path(self.path).name

  def values(self, key: str, kind: str) -> Optional[list]:
    """The runs' values of a headline number (None when a run lacks it, e.g. NME without memory)."""
    vals = [r.get(key, {}).get(kind) for r in self.runs]
    return None if any(v is None for v in vals) else [float(v) for v in vals]

  def curve(self, kind: str) -> Optional[tuple]:
    """(number of classes [S], accuracies [runs, S]) over the steps every run has finished; None without `kind`."""
    n = min(len(r['steps']) for r in self.runs)
    if n == 0 or any(r['steps'][0].get(kind) is None for r in self.runs):
      return None
    x = np.array([s['num_classes'] for s in self.first['steps'][:n]])
    return x, np.array([[s[kind]['all'] for s in r['steps'][:n]] for r in self.runs], float)

  def train_seconds(self) -> float:
    """Seconds of training and evaluation (the sum of the steps' `train_seconds`; a group trains its runs
    together, each run's steps time the whole group, so a group's time is its longest run's)."""
    return max(sum(float(s.get('train_seconds') or 0.0) for s in r['steps']) for r in self.runs)

  def compilations(self) -> Optional[int]:
    source = self.summary if self.summary is not None else self.first
    return source.get('compilations')

  def steps_done(self) -> str:
    return f"{min(len(r['steps']) for r in self.runs)}/{self.first['num_tasks']}"


def _read_json(path: str) -> dict:
  try:
    return json.loads(paths.as_path(path).read_text())
  except (OSError, ValueError) as e:
    raise ReportError(f'cannot read {path}: {e}') from None


def load_entries(path: str) -> list:
  """A RUN_DIR's entries: one per setting of a sweep, else the one of `load_entry`."""
  summary_file = paths.join(path, 'summary.json')
  if paths.as_path(summary_file).exists():
    summary = _read_json(summary_file)
    if 'sweep' in summary:
      return [Entry(paths.join(path, s['name']), [_read_json(paths.join(path, r, 'results.json')) for r in s['runs']],
                    {**s, 'num_runs': len(s['runs'])}) for s in summary['settings']]
  return [load_entry(path)]


def load_entry(path: str) -> Entry:
  """A RUN_DIR: a group when it holds summary.json, else a single run's results.json."""
  summary_file, results_file = paths.join(path, 'summary.json'), paths.join(path, 'results.json')
  if paths.as_path(summary_file).exists():
    summary = _read_json(summary_file)
    runs = [_read_json(paths.join(path, f'run_{k}', 'results.json')) for k in range(int(summary['num_runs']))]
    return Entry(path, runs, summary)
  if paths.as_path(results_file).exists():
    return Entry(path, [_read_json(results_file)])
  raise ReportError(f'{path} holds neither results.json (a run) nor summary.json (a num_runs group); pass the '
                    '--workdir of a run.')


def check_protocols(entries: Sequence[Entry], mix: bool = False) -> None:
  """Raises ReportError when the entries are of different protocols (data set or task sizes) and not `mix`."""
  kinds = {(e.dataset, e.task_sizes) for e in entries}
  if len(kinds) > 1 and not mix:
    found = '; '.join(f'{e.name}: {e.dataset} {protocol(e.task_sizes)}' for e in entries)
    raise ReportError(f'runs of different protocols cannot share one curve ({found}); pass --mix-protocols to '
                      'plot them together anyway.')


def mean_std(values: Optional[list]) -> tuple:
  """(mean, std) of the values (numpy, ddof=0); (None, None) without values; std None for a single run."""
  if values is None:
    return None, None
  return float(np.mean(values)), (float(np.std(values)) if len(values) > 1 else None)


def labels(entries: Sequence[Entry]) -> list:
  """The method name, with the directory's name where several entries share a method."""
  methods = [e.method for e in entries]
  return [e.method if methods.count(e.method) == 1 else f'{e.method} ({e.name})' for e in entries]


def rows(entries: Sequence[Entry]) -> list:
  """One dict per entry with every number of the table (the CSV's rows)."""
  out = []
  for entry, label in zip(entries, labels(entries)):
    row = {'run': label, 'path': entry.path, 'method': entry.method, 'dataset': entry.dataset,
           'protocol': protocol(entry.task_sizes), 'runs': len(entry.runs), 'steps': entry.steps_done()}
    for key, _ in METRICS:
      for kind in KINDS:
        row[f'{key}_{kind}_mean'], row[f'{key}_{kind}_std'] = mean_std(entry.values(key, kind))
    row['train_seconds'] = round(entry.train_seconds(), 1)
    row['compilations'] = entry.compilations()
    out.append(row)
  return out


def _cell(mean: Optional[float], std: Optional[float]) -> str:
  if mean is None:
    return '–'
  return f'{mean:.2f}' if std is None else f'{mean:.2f} ± {std:.2f}'


def markdown(table: Sequence[dict]) -> str:
  head = ['run', 'data set', 'protocol', 'runs', 'steps']
  head += [f'{label} {kind.upper()}' for key, label in METRICS for kind in KINDS]
  head += ['train s', 'compilations']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join(['---'] * 5 + ['---:'] * (len(head) - 5)) + '|']
  for r in table:
    cells = [r['run'], r['dataset'], r['protocol'], str(r['runs']), r['steps']]
    cells += [_cell(r[f'{key}_{kind}_mean'], r[f'{key}_{kind}_std']) for key, _ in METRICS for kind in KINDS]
    cells += [f"{r['train_seconds']:.1f}", '–' if r['compilations'] is None else str(r['compilations'])]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def environment_note(entries: Sequence[Entry]) -> str:
  """When the runs were computed in different environments (results.json `environment`: package versions,
  backend, devices, XLA flags), a Markdown list of each run's; '' when they agree. Their numbers may then differ by
  float rounding as well as by what the runs are."""
  envs = [entry.first.get('environment') for entry in entries]
  if all(env == envs[0] for env in envs):
    return ''
  lines = ['', 'The runs were computed in different environments (results.json `environment`):', '']
  for label, env in zip(labels(entries), envs):
    if env is None:
      lines.append(f'- {label}: not recorded')
      continue
    packages = ', '.join(f'{k} {v}' for k, v in env.get('versions', {}).items())
    lines.append(f"- {label}: {packages}; {env.get('device_count')} x {env.get('device_kind')} "
                 f"({env.get('backend')}); XLA_FLAGS={env.get('xla_flags') or '(none)'}")
  return '\n'.join(lines) + '\n'


def csv_text(table: Sequence[dict]) -> str:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(table[0]), lineterminator='\n')
  writer.writeheader()
  for r in table:
    writer.writerow({k: ('' if v is None else v) for k, v in r.items()})
  return buf.getvalue()


def plot(entries: Sequence[Entry], path: str) -> None:
  """Accuracy on the seen classes against the number of classes: a CNN panel, and an NME one when a run has NME;
  a group is its mean with a shaded ±std band."""
  from incremental_jax.metrics import _pyplot, save_figure
  plt = _pyplot()
  kinds = [k for k in KINDS if any(e.curve(k) is not None for e in entries)]
  fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False, sharey=True)
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for ax, kind in zip(axes[0], kinds):
    for i, (entry, label) in enumerate(zip(entries, labels(entries))):
      curve = entry.curve(kind)
      if curve is None:
        continue
      x, y = curve
      mean, color = y.mean(axis=0), colors[i % len(colors)]
      avg = mean_std(entry.values('avg_incremental_accuracy', kind))[0]
      runs = f', {len(entry.runs)} runs' if len(entry.runs) > 1 else ''
      ax.plot(x, mean, marker='o', color=color, label=f'{label} (avg {avg:.2f}{runs})')
      if len(entry.runs) > 1:
        std = y.std(axis=0)
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    ax.set_title(f'{kind.upper()}')
    ax.set_xlabel('number of classes')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0][0].set_ylabel('accuracy on the seen classes (%)')
  protocols = sorted({f'{e.dataset} {protocol(e.task_sizes)}' for e in entries})
  fig.suptitle(' | '.join(protocols), fontsize=10)
  fig.tight_layout()
  save_figure(fig, path, dpi=100)


def write_report(run_dirs: Sequence[str], out: str, mix_protocols: bool = False) -> str:
  """Writes report.md, report.csv and report.png of the RUN_DIRs `run_dirs` into `out` (each local or a bucket
  path); returns the Markdown."""
  if not run_dirs:
    raise ReportError('no RUN_DIR given.')
  entries = [e for p in run_dirs for e in load_entries(p)]
  check_protocols(entries, mix_protocols or (len(run_dirs) == 1 and len(entries) > 1))
  table = rows(entries)
  text = markdown(table) + environment_note(entries)
  paths.atomic_write(paths.join(out, 'report.md'), text)
  paths.atomic_write(paths.join(out, 'report.csv'), csv_text(table))
  plot(entries, paths.join(out, 'report.png'))
  return text


# ---- a paper's table ---------------------------------------------------------------------------------------
def _same(a, b) -> bool:
  return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def _row_runs(summary: dict, row) -> list:
  """The names of the sweep's runs of a paper row: those whose overrides agree with every field of its setting."""
  return [r['name'] for r in summary['runs'] if all(f in r['overrides'] and _same(r['overrides'][f], v)
                                                   for f, v in row.setting.items())]


def paper_rows(path: str, summary: dict, table) -> list:
  """One dict per row of the paper table `table` (a `sweeps.PaperTable`): its label, how many runs of the sweep
  at `path` it has, and per kind (cnn, nme) ours (mean, std over the runs, ddof=0), the paper's number and the
  difference ours - paper; None where a side has no number. With `table.error`, ours is 100 - accuracy."""
  out = []
  for row in table.rows:
    names = _row_runs(summary, row)
    results = [_read_json(paths.join(path, n, 'results.json')) for n in names]
    entry = {'setting': row.label, 'runs': len(results)}
    for kind in KINDS:
      vals = [r.get(table.metric, {}).get(kind) for r in results]
      vals = None if not vals or any(v is None for v in vals) else [100.0 - v if table.error else v for v in vals]
      mean, std = mean_std(vals)
      if vals is not None and std is None:
        std = 0.0
      paper = row.values.get(kind)
      entry[f'{kind}_mean'], entry[f'{kind}_std'], entry[f'{kind}_paper'] = mean, std, paper
      entry[f'{kind}_diff'] = None if mean is None or paper is None else mean - paper
    out.append(entry)
  return out


def _num(v: Optional[float], signed: bool = False) -> str:
  return '–' if v is None else (f'{v:+.2f}' if signed else f'{v:.2f}')


def paper_markdown(table, prows: Sequence[dict]) -> str:
  """The paper's table as Markdown: a row per setting, ours (mean ± std, runs), paper, difference, CNN then NME
  (NME only where ours or the paper has it); the citation and note under it."""
  what = ('top-1 error' if table.error else 'accuracy') + f" ({table.metric.replace('_', ' ')})"
  kinds = [k for k in KINDS if any(r[f'{k}_mean'] is not None or r[f'{k}_paper'] is not None for r in prows)] or ['cnn']
  head = ['setting', 'runs'] + [c for k in kinds for c in (f'ours {k.upper()}', f'paper {k.upper()}', 'diff')]
  lines = [f'### {table.title}', '', f'{what}, ours as mean ± std over the runs of each setting', '',
           '| ' + ' | '.join(head) + ' |', '|---|---:|' + '---:|' * (len(head) - 2)]
  for r in prows:
    cells = [r['setting'], str(r['runs'])]
    for k in kinds:
      cells += [_cell(r[f'{k}_mean'], r[f'{k}_std']), _num(r[f'{k}_paper']), _num(r[f'{k}_diff'], signed=True)]
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += ['', f'Paper: {table.citation}.']
  if table.note:
    lines.append(f'Note: {table.note}.')
  return '\n'.join(lines) + '\n'


def paper_plot(path: str, summary: dict, table, out_file: str) -> None:
  """Accuracy on the seen classes against the number of classes, one panel per row of the table: each kind's mean
  over the row's runs with a shaded ±std band."""
  from incremental_jax.metrics import _pyplot, save_figure
  plt = _pyplot()
  rows = [(row, _row_runs(summary, row)) for row in table.rows]
  rows = [(row, names) for row, names in rows if names]
  fig, axes = plt.subplots(1, max(len(rows), 1), figsize=(4.2 * max(len(rows), 1), 3.6), squeeze=False, sharey=True)
  for ax, (row, names) in zip(axes[0], rows):
    entry = Entry(row.label, [_read_json(paths.join(path, n, 'results.json')) for n in names])
    for kind in KINDS:
      curve = entry.curve(kind)
      if curve is None:
        continue
      x, y = curve
      mean, std = y.mean(axis=0), y.std(axis=0)
      ax.plot(x, mean, marker='o', markersize=3, label=f'{kind.upper()} ({len(names)} runs)')
      ax.fill_between(x, mean - std, mean + std, alpha=0.2, linewidth=0)
    ax.set_title(row.label, fontsize=10)
    ax.set_xlabel('number of classes')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0][0].set_ylabel('accuracy on the seen classes (%)')
  fig.suptitle(table.title, fontsize=10)
  fig.tight_layout()
  save_figure(fig, out_file, dpi=100)


def paper_report(path: str, out: str, table_name: str = '') -> str:
  """Writes paper.md, paper.csv and paper.png of the sweep at `path` against the paper table `table_name` (default:
  the one its summary.json names) into `out`; returns the Markdown."""
  from incremental_jax import sweeps
  from incremental_jax.errors import ConfigError
  summary_file = paths.join(path, 'summary.json')
  summary = _read_json(summary_file) if paths.as_path(summary_file).exists() else {}
  if 'sweep' not in summary:
    raise ReportError(f'{path} is not a sweep (no summary.json with a sweep); a paper table needs one.')
  name = table_name or summary.get('reference_table') or ''
  if not name:
    raise ReportError(f'{path}: its sweep names no reference_table; pass --table=<configs module>:<table>.')
  try:
    table = sweeps.find_table(name)
  except ConfigError as e:
    raise ReportError(str(e)) from None
  prows = paper_rows(path, summary, table)
  text = paper_markdown(table, prows)
  paths.atomic_write(paths.join(out, 'paper.md'), text)
  paths.atomic_write(paths.join(out, 'paper.csv'), csv_text(prows))
  paper_plot(path, summary, table, paths.join(out, 'paper.png'))
  return text


def _names_table(run_dirs: Sequence[str]) -> bool:
  """Whether the single RUN_DIR is a sweep whose summary names a paper table."""
  if len(run_dirs) != 1:
    return False
  summary_file = paths.join(run_dirs[0], 'summary.json')
  if not paths.as_path(summary_file).exists():
    return False
  return bool(_read_json(summary_file).get('reference_table'))


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m incremental_jax.report', description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('run_dirs', nargs='+', metavar='RUN_DIR', help='workdir of a run or of a num_runs group')
  parser.add_argument('--out', default='.', help='directory of report.md, report.csv and report.png (default: .)')
  parser.add_argument('--mix-protocols', action='store_true',
                      help='plot runs of different data sets or task sizes together')
  parser.add_argument('--table', default='',
                      help="a paper table '<configs module>:<table>' to compare a sweep with (default: the one its "
                           'summary.json names)')
  args = parser.parse_args(argv)
  try:
    if args.table or _names_table(args.run_dirs):
      if len(args.run_dirs) != 1:
        raise ReportError('a paper table compares one sweep: pass a single RUN_DIR with --table.')
      text, first = paper_report(args.run_dirs[0], args.out, args.table), 'paper'
    else:
      text, first = write_report(args.run_dirs, args.out, args.mix_protocols), 'report'
  except ReportError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 2
  print(text, end='')
  print(f"{first} written to {paths.join(args.out, first + '.md')}, {first}.csv and {first}.png", flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
