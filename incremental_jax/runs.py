"""Several independent runs of one protocol in one process (`num_runs` > 1), trained together.

Run k is the config with `seed + k` and, with `runs_vary='seed_and_order'` (default) or 'order',
`data.class_order_seed + k` (a different class order per run, as papers report mean +- std over orders). Each
run has its own workdir `run_k/` (checkpoints, results.json, plots: exactly what that config alone would
write); the runs' phases are trained by one vmapped step (`train.run_phase_group`), their host hooks
(imprinting, exemplar selection, evaluation) run one after the other. `summary.json` in the workdir holds every
run's summary and the mean and standard deviation over runs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np

from incremental_jax import parallel
from incremental_jax import train as train_lib
from incremental_jax.run import RunSession, _run_phases, phase_task_info
from incremental_jax.data import class_orders
from incremental_jax.errors import ConfigError

VARY = ('seed_and_order', 'seed', 'order')
SUMMARY_KEYS = ('avg_incremental_accuracy', 'last_accuracy', 'average_forgetting')


def run_configs(config) -> list:
  """The config of each of the `num_runs` runs (with `num_runs` 1, so each is an ordinary single run)."""
  n, vary = int(config.get('num_runs', 1)), str(config.get('runs_vary', 'seed_and_order'))
  if n < 1:
    raise ConfigError(f'num_runs must be at least 1; got {n}.')
  if vary not in VARY:
    raise ConfigError(f'runs_vary must be one of {list(VARY)}; got {vary!r}.')
  if vary != 'seed' and tuple(config.data.get('class_order', ()) or ()):
    raise ConfigError("data.class_order fixes the class order, so runs cannot vary it; set runs_vary='seed' or "
                      'clear data.class_order.')
  if n > 1 and int(config.checkpoint.get('every_epochs', 0) or 0) > 0:
    raise ConfigError('checkpoint.every_epochs (mid-task checkpoints) is not supported with num_runs > 1; runs '
                      'trained together checkpoint after every task.')
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


def train_and_evaluate_runs(config, workdir: str, *, show_progress: bool = True) -> dict:
  """Trains the `num_runs` runs of `config` together (module docstring); resumes each from its own
  checkpoints. Returns the summary that is also written to `workdir/summary.json`."""
  configs = run_configs(config)
  mesh = parallel.make_mesh()
  sessions = [RunSession(c, os.path.join(workdir, f'run_{k}'), show_progress=False, mesh=mesh)
              for k, c in enumerate(configs)]
  lead = sessions[0]
  group_trainer = train_lib.Trainer(lead.model, lead.method, mesh, lead.aug_fn, seed=lead.config.seed,
                                    show_progress=show_progress)
  num_tasks = lead.scenario.num_tasks
  for t in range(min(s.start_task for s in sessions), num_tasks):
    t0 = time.time()
    active = [s for s in sessions if s.start_task <= t]
    ctxs = [s.begin_task(t) for s in active]
    losses = [{} for _ in active]
    ctxs, losses = _train_together(group_trainer, active, ctxs, [s.method.phases(c) for s, c in zip(active, ctxs)],
                                   losses)
    ctxs = [s.update_memory(c) for s, c in zip(active, ctxs)]
    ctxs, losses = _train_together(group_trainer, active, ctxs,
                                   [s.method.balancing_phases(c) for s, c in zip(active, ctxs)], losses)
    records = [s.end_task(c, l, t0) for s, c, l in zip(active, ctxs, losses)]
    if show_progress and jax.process_index() == 0:
      print(_task_line(t, records), flush=True)
  results = [s.finish(group_trainer.compile_count + s.trainer.compile_count) for s in sessions]
  summary = summarize_runs(results, [s.workdir for s in sessions])
  summary['compilations'] = group_trainer.compile_count
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=1)
    if show_progress:
      print(format_runs_summary(summary), flush=True)
      print(f"summary written to {os.path.join(workdir, 'summary.json')}", flush=True)
  return summary


def _train_together(trainer, sessions: list, ctxs: list, phase_lists: list, losses: list):
  """Trains each session's phases; the i-th phases of all sessions together (one alone runs unbatched)."""
  if len(sessions) == 1:
    s = sessions[0]
    ctx, loss = _run_phases(s.trainer, s.method, ctxs[0], phase_lists[0], s.data, losses[0])
    return [ctx], [loss]
  names = [[p.name for p in phases] for phases in phase_lists]
  if any(n != names[0] for n in names):
    raise RuntimeError(f'runs trained together must have the same phases; got {names}.')
  for i in range(len(names[0])):
    phases = [pl[i] for pl in phase_lists]
    t = ctxs[0].task
    tasks = [phase_task_info(s.method, c, p) for p, c, s in zip(phases, ctxs, sessions)]
    desc = f'task {t + 1}/{ctxs[0].scenario.num_tasks} {phases[0].name} ({len(sessions)} runs)'
    results = train_lib.run_phase_group(
        trainer, [c.state for c in ctxs], [c.frozen for c in ctxs], tasks, phases, ctxs[0].train_images,
        [s.data.train_labels for s in sessions],
        [(int(c.config.seed), t, len(l)) for c, l in zip(ctxs, losses)], [int(c.config.seed) for c in ctxs], desc)
    for k, (r, c) in enumerate(zip(results, ctxs)):
      train_lib.check_finite(r.state, f'run {k} {desc}')
      losses[k][phases[0].name] = [round(m['loss'], 6) for m in r.epoch_metrics]
    ctxs = [dataclasses.replace(c, state=r.state) for c, r in zip(ctxs, results)]
  return ctxs, losses


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


def _task_line(t: int, records: list) -> str:
  cnn = ' '.join(f"{r['cnn']['all']:.2f}" for r in records)
  msg = f"step {t}: CNN {cnn}"
  if records[0].get('nme'):
    msg += '  NME ' + ' '.join(f"{r['nme']['all']:.2f}" for r in records)
  return msg
