"""Incremental-learning metrics and the run's result files (results.json, results.csv, PNG plots).

Accuracy matrix A (percent): A[i][j] = accuracy on the classes of task j after learning step i (None for
j > i). Average incremental accuracy (Rebuffi et al. 2017): mean over steps i of the accuracy on all classes
seen at step i. Average forgetting (Chaudhry et al. 2018): for the final step T-1,
    F = mean_{j < T-1} [ max_{l in [j, T-2]} A[l][j] - A[T-1][j] ].
"""
from __future__ import annotations

import csv
import io
import json
from typing import Optional, Sequence

import numpy as np

from incremental_jax import paths


def accuracy_matrix(steps: Sequence[dict], kind: str) -> Optional[list]:
  """Rows of per-task accuracies from per-step records (`kind` 'cnn' or 'nme'); None if absent."""
  if not steps or steps[0].get(kind) is None:
    return None
  t = len(steps)
  return [[(s[kind]['per_task'][j] if j < len(s[kind]['per_task']) else None) for j in range(t)] for s in steps]


def average_incremental_accuracy(step_accuracies: Sequence[float]) -> Optional[float]:
  return float(np.mean(step_accuracies)) if len(step_accuracies) else None


def average_forgetting(matrix: Sequence[Sequence[Optional[float]]]) -> Optional[float]:
  """Chaudhry et al. (2018) forgetting after the last step; None with a single step."""
  t = len(matrix)
  if t < 2:
    return None
  drops = [max(matrix[l][j] for l in range(j, t - 1)) - matrix[t - 1][j] for j in range(t - 1)]
  return float(np.mean(drops))


def summarize(steps: Sequence[dict]) -> dict:
  """The headline numbers of a run from its per-step records."""
  out = {'avg_incremental_accuracy': {}, 'last_accuracy': {}, 'average_forgetting': {}, 'accuracy_matrix': {}}
  for kind in ('cnn', 'nme'):
    matrix = accuracy_matrix(steps, kind)
    out['accuracy_matrix'][kind] = matrix
    if matrix is None:
      for key in ('avg_incremental_accuracy', 'last_accuracy', 'average_forgetting'):
        out[key][kind] = None
      continue
    alls = [s[kind]['all'] for s in steps]
    out['avg_incremental_accuracy'][kind] = average_incremental_accuracy(alls)
    out['last_accuracy'][kind] = float(alls[-1])
    out['average_forgetting'][kind] = average_forgetting(matrix)
  return out


CSV_FIELDS = ('step', 'num_classes', 'cnn_all', 'cnn_old', 'cnn_new', 'nme_all', 'nme_old', 'nme_new',
              'memory_size', 'train_seconds')


def csv_rows(steps: Sequence[dict]) -> list[dict]:
  rows = []
  for s in steps:
    row = {'step': s['step'], 'num_classes': s['num_classes'], 'memory_size': s.get('memory_size'),
           'train_seconds': s.get('train_seconds')}
    for kind in ('cnn', 'nme'):
      for part in ('all', 'old', 'new'):
        row[f'{kind}_{part}'] = None if s.get(kind) is None else s[kind][part]
    rows.append(row)
  return rows


def write_results(workdir: str, results: dict, plots: bool = True) -> None:
  """Writes results.json, results.csv and (optionally) the plots into `workdir` (a local folder or a bucket
  path, see `paths`); each file is replaced atomically."""
  paths.atomic_write(paths.join(workdir, 'results.json'), json.dumps(results, indent=2, allow_nan=False))
  text = io.StringIO(newline='')
  writer = csv.DictWriter(text, fieldnames=CSV_FIELDS)
  writer.writeheader()
  for row in csv_rows(results['steps']):
    writer.writerow({k: ('' if v is None else v) for k, v in row.items()})
  paths.atomic_write(paths.join(workdir, 'results.csv'), text.getvalue())
  if plots and results['steps']:
    plot_accuracy_per_step(results, paths.join(workdir, 'accuracy_per_step.png'))
    plot_accuracy_matrix(results, paths.join(workdir, 'accuracy_matrix.png'))


def save_figure(fig, path: str, dpi: int = 120) -> None:
  """Saves a matplotlib figure as PNG at `path` (local or bucket), atomically, and closes it."""
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=dpi)
  _pyplot().close(fig)
  paths.atomic_write(path, buf.getvalue())


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def plot_accuracy_per_step(results: dict, path: str) -> None:
  """Accuracy on all seen classes against the number of classes seen (CNN and NME)."""
  plt = _pyplot()
  steps = results['steps']
  x = [s['num_classes'] for s in steps]
  fig, ax = plt.subplots(figsize=(6, 4))
  for kind, marker in (('cnn', 'o'), ('nme', 's')):
    if steps[0].get(kind) is not None:
      avg = results['avg_incremental_accuracy'][kind]
      ax.plot(x, [s[kind]['all'] for s in steps], marker=marker, label=f'{kind.upper()} (avg {avg:.2f})')
  ax.set_xlabel('number of classes seen')
  ax.set_ylabel('top-1 accuracy on seen classes (%)')
  ax.set_title(f"{results.get('method', '')} on {results.get('dataset', '')}")
  ax.set_xticks(x)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  save_figure(fig, path)


def plot_accuracy_matrix(results: dict, path: str) -> None:
  """Heatmap of accuracy on task j (column) after step i (row), one panel per evaluation (CNN, NME)."""
  plt = _pyplot()
  kinds = [k for k in ('cnn', 'nme') if results['accuracy_matrix'].get(k) is not None]
  fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 4), squeeze=False)
  for ax, kind in zip(axes[0], kinds):
    m = np.array([[np.nan if v is None else v for v in row] for row in results['accuracy_matrix'][kind]], float)
    im = ax.imshow(m, vmin=0, vmax=100, cmap='viridis')
    for i in range(m.shape[0]):
      for j in range(m.shape[1]):
        if not np.isnan(m[i, j]):
          ax.text(j, i, f'{m[i, j]:.0f}', ha='center', va='center', fontsize=8,
                  color='white' if m[i, j] < 60 else 'black')
    ax.set_xlabel('task')
    ax.set_ylabel('after step')
    ax.set_title(f'{kind.upper()} accuracy (%)')
    fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  save_figure(fig, path)


def format_summary(results: dict) -> str:
  """A short text table of the headline numbers."""
  lines = [f"{results.get('method', '')} on {results.get('dataset', '')}: {len(results['steps'])} steps"]
  lines.append(f"{'':>28} {'CNN':>8} {'NME':>8}")
  for key, label in (('avg_incremental_accuracy', 'avg incremental accuracy'), ('last_accuracy', 'last accuracy'),
                     ('average_forgetting', 'average forgetting')):
    vals = [results[key].get(k) for k in ('cnn', 'nme')]
    lines.append(f'{label:>28} ' + ' '.join(f'{v:8.2f}' if v is not None else f"{'-':>8}" for v in vals))
  return '\n'.join(lines)
