"""A comparison report over run workdirs: `python -m incremental_jax.report RUN_DIR... [--out DIR]`.

Each RUN_DIR is a single run (its `results.json`) or a `num_runs` group (`summary.json` and `run_k/results.json`).
Writes into `--out` (default: the current directory)
  report.md   a Markdown table: method, data set, protocol (base + increments), average incremental CNN / NME
              accuracy, last accuracy and average forgetting (a group: mean ± std over its runs, numpy's std with
              ddof=0 as summary.json), train time, compiled train steps;
  report.csv  the same numbers, one column per mean and std;
  report.png  accuracy on the seen classes against the number of classes (CNN, and NME where a run has it),
              every run a curve, a group its mean with a shaded ±std band;
and prints the Markdown table. Runs of different protocols (data set or task sizes) share no curve: the report
refuses them (one line on stderr, exit status 2) unless `--mix-protocols` is given.
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
  entries = [load_entry(p) for p in run_dirs]
  check_protocols(entries, mix_protocols)
  table = rows(entries)
  text = markdown(table) + environment_note(entries)
  paths.atomic_write(paths.join(out, 'report.md'), text)
  paths.atomic_write(paths.join(out, 'report.csv'), csv_text(table))
  plot(entries, paths.join(out, 'report.png'))
  return text


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m incremental_jax.report', description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('run_dirs', nargs='+', metavar='RUN_DIR', help='workdir of a run or of a num_runs group')
  parser.add_argument('--out', default='.', help='directory of report.md, report.csv and report.png (default: .)')
  parser.add_argument('--mix-protocols', action='store_true',
                      help='plot runs of different data sets or task sizes together')
  args = parser.parse_args(argv)
  try:
    text = write_report(args.run_dirs, args.out, args.mix_protocols)
  except ReportError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 2
  print(text, end='')
  print(f"report written to {paths.join(args.out, 'report.md')}, report.csv and report.png", flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
