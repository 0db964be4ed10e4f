"""Several independent runs of one protocol in one process (`num_runs` > 1): their configs and their summary.

Run k is the config with `seed + k` and, with `runs_vary='seed_and_order'` (default) or 'order',
`data.class_order_seed + k` (a different class order per run, as papers report mean +- std over orders). Each
run has its own workdir `run_k/` (checkpoints, results.json, plots: exactly what that config alone would
write); the run loop (`incremental_jax.run`) trains the runs' phases by one vmapped step and runs their host hooks
(imprinting, exemplar selection, evaluation) one after the other. `summary.json` in the workdir holds every
run's summary and the mean and standard deviation over runs.
"""
from __future__ import annotations

import json

import jax
import numpy as np

from incremental_jax import paths
from incremental_jax.data import class_orders
from incremental_jax.errors import ConfigError

VARY = ('seed_and_order', 'seed', 'order')
SUMMARY_KEYS = ('avg_incremental_accuracy', 'last_accuracy', 'average_forgetting')


def run_configs(config) -> list:
  """The config of each of the `num_runs` runs (with `num_runs` 1, so each is an ordinary single run)."""
  n, vary = int(config.num_runs), str(config.runs_vary)
  if n < 1:
    raise ConfigError(f'num_runs must be at least 1; got {n}.')
  if vary not in VARY:
    raise ConfigError(f'runs_vary must be one of {list(VARY)}; got {vary!r}.')
  if n == 1:
    return [config]
  if vary != 'seed' and tuple(config.data.class_order or ()):
    raise ConfigError("data.class_order fixes the class order, so runs cannot vary it; set runs_vary='seed' or "
                      'clear data.class_order.')
  configs = []
  for k in range(n):
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.num_runs = 1
      c.seed = int(config.seed) + (k if vary != 'order' else 0)
      if vary != 'seed':
        c.data.class_order_seed = int(config.data.class_order_seed) + k
        if config.data.named_order:  # run k: the k-th published order after the configured one
          c.data.named_order = class_orders.run_named_order(config.data.named_order, k)
    configs.append(c)
  return configs


def summarize_runs(results: list, workdirs: list) -> dict:
  """Mean and standard deviation (numpy's, ddof=0) over runs of the average incremental accuracy, last
  accuracy and average forgetting (CNN, and NME where the method has it), with each run's values."""
  per_run = [{'workdir': w, 'seed': r['config']['seed'], 'class_order': r['class_order'],
              **{k: r.get(k) for k in SUMMARY_KEYS}} for r, w in zip(results, workdirs)]
  summary = {'method': results[0]['method'], 'dataset': results[0]['dataset'], 'num_runs': len(results),
             'runs': per_run}
  for key in SUMMARY_KEYS:
    for kind in ('cnn', 'nme'):
      vals = [r[key][kind] for r in results]
      if all(v is not None for v in vals):
        summary.setdefault(key, {})[kind] = {'mean': float(np.mean(vals)), 'std': float(np.std(vals))}
  return summary


def format_runs_summary(summary: dict) -> str:
  lines = [f"{summary['num_runs']} runs of {summary['method']} on {summary['dataset']} (mean +- std):"]
  for key in SUMMARY_KEYS:
    if key in summary:
      parts = [f"{kind.upper()} {v['mean']:.2f} +- {v['std']:.2f}" for kind, v in summary[key].items()]
      lines.append(f"  {key.replace('_', ' ')}: " + '   '.join(parts))
  return '\n'.join(lines)


def write_summary(workdir: str, summary: dict, show_progress: bool) -> None:
  """`workdir/summary.json` (process 0; local or in a bucket), and the summary printed when `show_progress`."""
  if jax.process_index() != 0:
    return
  path = paths.join(workdir, 'summary.json')
  paths.atomic_write(path, json.dumps(summary, indent=1))
  if show_progress:
    print(format_runs_summary(summary), flush=True)
    print(f'summary written to {path}', flush=True)


def task_line(t: int, records: list) -> str:
  cnn = ' '.join(f"{r['cnn']['all']:.2f}" for r in records)
  msg = f"step {t}: CNN {cnn}"
  if records[0].get('nme'):
    msg += '  NME ' + ' '.join(f"{r['nme']['all']:.2f}" for r in records)
  return msg
