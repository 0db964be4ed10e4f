"""A whole class-incremental protocol: `train_and_evaluate(config, workdir) -> results`.

One task loop over a list of runs. A single run is a list of one; `num_runs` > 1 is a longer list (run k has its
own seed and class order and its own workdir `run_k/`) whose phases are trained together by one vmapped step,
while their host hooks (imprinting, exemplar selection, evaluation) run one after the other.

Each run is a fixed `RunSpec` (`run_spec`), a `RunStore` for its workdir (`store`) and a `RunState` value
(`run_state`) that every stage of a task (`task_stages`) returns anew and the loop rebinds; the store saves it
after each task, and running the same command again restores it and continues to the results of an uninterrupted
run (also from inside a task, after a mid-task checkpoint or a stop request).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import jax

from incremental_jax import backend_tuning
from incremental_jax import metrics as metrics_lib
from incremental_jax import parallel
from incremental_jax import paths
from incremental_jax import preemption
from incremental_jax import runs as runs_lib
from incremental_jax import startup
from incremental_jax import sweeps
from incremental_jax import task_stages
from incremental_jax import train as train_lib
from incremental_jax import validate
from incremental_jax.environment import use_compilation_cache
from incremental_jax.errors import ConfigError
from incremental_jax.run_spec import build_run_spec, initial_state, load_images
from incremental_jax.store import RunStore


def open_run(config, workdir: str, mesh, images: Optional[tuple] = None) -> tuple:
  """(spec, store, state) of the run of `config` in `workdir`: its data (`images`, shared with other runs, see
  `run_spec.build_run_spec`) and method, its workdir, and the state of its latest checkpoint (the initial state
  of a new run)."""
  spec = build_run_spec(config, workdir, mesh, images)
  store = RunStore(spec)
  return spec, store, store.restore(initial_state(spec))


def train_and_evaluate(config, workdir: str, *, show_progress: Optional[bool] = None) -> dict:
  """Runs (or resumes) the incremental protocol of `config`, writing checkpoints and results into `workdir`.

  Returns the results dict that is also written to `workdir/results.json`; with `num_runs` > 1, the runs'
  summary that is also written to `workdir/summary.json` (each run's results are in `workdir/run_k/`); with a
  `sweep`, the sweep's summary (`train_sweep`). Every input is checked before any training (`validate`, the data
  set, the scenario, the checkpoint directory). With several processes (`jax.distributed`), every process calls
  this; only process 0 writes results, plots and progress. A finished workdir is left as it is and its results
  returned.
  """
  preemption.reset()        # a stop that ended an earlier run of this process is not this run's
  backend_tuning.set_up()   # XLA:CPU flags before validation's jax.device_count() starts the backend
  show_progress = config.progress if show_progress is None else show_progress
  if str(config.sweep or '').strip():
    return train_sweep(config, workdir, show_progress)
  configs = runs_lib.run_configs(config)
  for c in configs:
    validate.validate_config(c)   # before anything starts (the mesh, data loading)
  use_compilation_cache(config.compilation_cache)
  group = len(configs) > 1
  workdirs = [os.path.join(workdir, f'run_{k}') for k in range(len(configs))] if group else [workdir]
  results, compilations = train_runs(configs, workdirs, workdir, show_progress)
  return results[0] if not group else _summary(workdir, workdirs, results, compilations, show_progress)


def train_sweep(config, workdir: str, show_progress: bool) -> dict:
  """Trains (or resumes) every run of `config.sweep` (`sweeps.sweep_runs`) into its subfolder of `workdir`, the
  runs that differ only in seed and class order as one group (`sweeps.train_groups`), groups one after another;
  writes and returns `workdir/summary.json` (`sweeps.summarize`). Every run's config and data are checked before
  anything trains; a finished run is not trained again."""
  sweep_runs = sweeps.sweep_runs(config)
  for r in sweep_runs:
    validate.validate_config(r.config)
  if config.reference_table:
    sweeps.find_table(str(config.reference_table))
  if paths.as_path(paths.join(workdir, 'checkpoints')).exists():
    raise ConfigError(f'{workdir} holds a single run (checkpoints/); a sweep needs a workdir of its own.')
  groups = sweeps.train_groups(sweep_runs)
  for g in groups:   # the data and scenario of every group, before the first one trains
    validate_data(sweep_runs[g[0]].config)
  use_compilation_cache(config.compilation_cache)
  results, trained = [None] * len(sweep_runs), []
  for g in groups:
    workdirs = [paths.join(workdir, sweep_runs[i].name) for i in g]
    if show_progress and jax.process_index() == 0:
      print(f"sweep: training {', '.join(sweep_runs[i].name for i in g)}", flush=True)
    group_results, compilations = train_runs([sweep_runs[i].config for i in g], workdirs, workdir, show_progress)
    for i, res in zip(g, group_results):
      results[i] = res
    trained.append({'runs': g, **compilations})
  summary = sweeps.summarize(str(config.sweep), sweep_runs, results, trained, str(config.reference_table or ''))
  if jax.process_index() == 0:
    paths.atomic_write(paths.join(workdir, 'summary.json'), json.dumps(summary, indent=1))
    if show_progress:
      print(sweeps.format_summary(summary), flush=True)
      print(f"summary written to {paths.join(workdir, 'summary.json')}", flush=True)
  return summary


def validate_data(config) -> None:
  """The checks of `config` against its data set and scenario (`validate.validate_against_data`), without placing
  the images or building anything."""
  from incremental_jax.run_spec import prepare_data
  data = prepare_data(config)
  validate.validate_against_data(config, data.dataset, data.scenario)


def train_runs(configs: list, workdirs: list, root: str, show_progress: bool) -> tuple:
  """Trains (or resumes) the runs of `configs` together into `workdirs` (`root`: the workdir named in messages
  of a group); returns (each run's results, {'compilations': n[, 'subnetwork_compilations': m]}). A group whose
  runs are all finished is left as it is (its results as written)."""
  group = len(configs) > 1
  mesh = parallel.make_mesh()
  images = load_images(configs[0], mesh)   # one placed copy of the data set for every run
  specs, stores, states = map(list, zip(*(open_run(c, w, mesh, images) for c, w in zip(configs, workdirs))))
  talk = show_progress and jax.process_index() == 0
  if talk and not group:
    _print_resume(specs[0], stores[0], states[0])
  if talk:
    print(startup.session_summary(specs, states, root, configs[0]), flush=True)
  num_tasks = specs[0].scenario.num_tasks
  if all(s.cursor.task >= num_tasks for s in states):
    results = _finished(stores, states, show_progress and not group)
    return results, {k: results[0][k] for k in ('compilations', 'subnetwork_compilations') if k in results[0]}
  for store, state in zip(stores, states):
    store.log_restored(state)
  trainer = train_lib.Trainer(specs[0].model, specs[0].method, mesh, specs[0].augment_fn, show_progress=show_progress)
  subnetworks = train_lib.SubnetworkTrainer(mesh, show_progress=bool(configs[0].progress))
  try:
    states = run_tasks(specs, stores, states, trainer, subnetworks, int(configs[0].checkpoint.every_epochs or 0),
                       show_progress)
  except preemption.StopRequested as stop:
    for store in stores:   # the checkpoints the stop saved are complete before the process exits
      store.publish_saved()
    where = root if group else specs[0].workdir
    raise preemption.Preempted(preemption.message(where, str(stop), stores[0].latest_step())) from None
  except BaseException as error:
    lost = preemption.lost_process(error)
    if lost is not None:   # a dead process: a save in flight cannot complete, so none is waited for
      where = root if group else specs[0].workdir
      raise preemption.ProcessLost(preemption.lost_message(lost, error, where, stores[0].latest_complete_step())) \
          from error
    for store in stores:   # a task-end checkpoint may still be written: complete it, and report its task
      store.publish_saved()
    raise
  compilations = {'compilations': trainer.compile_count}
  if subnetworks.compile_count:
    compilations['subnetwork_compilations'] = subnetworks.compile_count
  results = [finish(spec, store, state, compilations, show_progress and not group)
             for spec, store, state in zip(specs, stores, states)]
  return results, compilations


def run_tasks(specs: list, stores: list, states: list, trainer: train_lib.Trainer,
              subnetworks: train_lib.SubnetworkTrainer, every: int, show_progress: bool) -> list:
  """The task loop of the runs (trained together), from the first task any of them has left; returns their
  final states. A run restored further than another waits for it (it is not trained again)."""
  num_tasks, group = specs[0].scenario.num_tasks, len(specs) > 1
  pending = [None] * len(specs)
  for t in range(min(s.cursor.task for s in states), num_tasks):
    active = [k for k, s in enumerate(states) if s.cursor.task <= t]
    runs = [task_stages.begin_task(specs[k], stores[k], states[k], t, subnetworks, pending[k]) for k in active]
    runs = task_stages.train_stage(trainer, runs, task_stages.MAIN, [r.spec.method.phases(r.ctx) for r in runs],
                                   every)
    runs = [task_stages.memory_stage(r) for r in runs]
    runs = task_stages.train_stage(trainer, runs, task_stages.BALANCING,
                                   [r.spec.method.balancing_phases(r.ctx) for r in runs], every)
    runs = task_stages.after_stage(runs)
    ends = dict(zip(active, (task_stages.end_task(r, show_progress and not group) for r in runs)))
    states = [ends[k][0] if k in ends else s for k, s in enumerate(states)]
    pending = [ends[k][1] if k in ends else p for k, p in enumerate(pending)]
    if group and show_progress and jax.process_index() == 0:
      print(runs_lib.task_line(t, [ends[k][0].records[-1] for k in active]), flush=True)
    if t + 1 < num_tasks and preemption.requested():
      raise preemption.StopRequested(f'after step {t}')
  return states


def finish(spec, store: RunStore, state, compilations: dict, show_progress: bool) -> dict:
  """Closes the run's store and writes its final results, with `compilations` (the numbers of compiled train
  steps: the run's own, and its method's sub-networks' when it trains any)."""
  store.close()
  results = store.results(state.records, **compilations)
  store.write_results(results, plots=True)
  if show_progress and jax.process_index() == 0:
    print(metrics_lib.format_summary(results), flush=True)
    print(f'results written to {paths.join(spec.workdir, "results.json")}', flush=True)
  return results


def _finished(stores: list, states: list, show_progress: bool) -> list:
  """A rerun of a finished workdir: its runs' results as they were written (written now, without compilation
  counts, only where results.json is missing or behind its checkpoints)."""
  results = []
  for store, state in zip(stores, states):
    store.close()
    written = store.existing_results()
    if written is None or len(written.get('steps', ())) != len(state.records):   # a process that died before its
      written = store.results(state.records)                                    # final write left it behind
      store.write_results(written, plots=True)
    results.append(written)
  if show_progress and jax.process_index() == 0:
    print(metrics_lib.format_summary(results[0]), flush=True)
  return results


def _summary(workdir: str, workdirs: list, results: list, compilations: dict, show_progress: bool) -> dict:
  summary = {**runs_lib.summarize_runs(results, workdirs), **compilations}
  runs_lib.write_summary(workdir, summary, show_progress)
  return summary


def _print_resume(spec, store: RunStore, state) -> None:
  cursor = state.cursor
  if not cursor.task and cursor.in_task is None:
    return
  in_task, n = cursor.in_task, spec.scenario.num_tasks
  where = (f'in step {cursor.task} (every phase done)' if in_task and in_task.stage == task_stages.AFTER else
           f"in step {cursor.task} (phase {in_task.phase_name!r}, epoch {in_task.epoch})" if in_task else
           f'after step {cursor.task - 1}')
  print(f'resuming {spec.workdir} {where} of steps 0-{n - 1} (checkpoint step {store.latest_step()})', flush=True)
