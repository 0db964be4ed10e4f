"""A whole class-incremental protocol: `train_and_evaluate(config, workdir) -> results`.

One task loop over a list of runs. A single run is a list of one; `num_runs` > 1 is a longer list (`runs`:
run k has its own seed and class order and its own workdir `run_k/`) whose phases are trained together by one
vmapped step, while their host hooks (imprinting, exemplar selection, evaluation) run one after the other.

Each run is split in two:
- `RunSpec`, what is fixed for the run (config, data and scenario, method and its networks, augmentation,
  predict/embed, mesh), built by `build_run_spec`;
- `RunState`, the one mutable state (train state, frozen teachers, method state, exemplar memory, step
  records): the only thing the loop updates and the only thing checkpointed (`RunStore`).

For each task t: the method's hooks and phases (see `methods.base`), the exemplar memory update, evaluation (CNN
and NME), a checkpoint, and the result files. Running it again on the same workdir resumes after the last
completed task (or inside a task, from a mid-task checkpoint) and produces the same results as an
uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from incremental_jax import checkpoint as ckpt_lib
from incremental_jax import config as cfglib
from incremental_jax import environment as environment_lib
from incremental_jax import evaluate as eval_lib
from incremental_jax import faults
from incremental_jax import memory as memory_lib
from incremental_jax import metrics as metrics_lib
from incremental_jax import parallel
from incremental_jax import paths
from incremental_jax import preemption
from incremental_jax import runs as runs_lib
from incremental_jax import startup
from incremental_jax import tensorboard
from incremental_jax import train as train_lib
from incremental_jax import validate
from incremental_jax.data import augment, pipeline, scenario as scenario_lib, sources
from incremental_jax.errors import CheckpointError
from incremental_jax.methods import Method, build_method
from incremental_jax.methods.base import TaskContext
from incremental_jax.step import check_finite, init_train_state, make_optimizer, make_task_info
from incremental_jax.types import TrainState


@dataclasses.dataclass(frozen=True)
class RunData:
  """The data of a run with labels remapped to class-order positions."""
  dataset: sources.Dataset
  scenario: scenario_lib.Scenario
  train_labels: np.ndarray
  test_labels: np.ndarray


def prepare_data(config, dataset: Optional[sources.Dataset] = None) -> RunData:
  dataset = sources.load_dataset(config.data) if dataset is None else dataset
  scenario = scenario_lib.make_scenario(dataset.num_classes, config.data)
  return RunData(dataset, scenario, scenario.remap(dataset.train_labels), scenario.remap(dataset.test_labels))


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """What is fixed for one run. `config_dict` is the config as JSON (checkpoint metadata, results)."""
  config: Any
  workdir: str
  data: RunData
  method: Method
  augment_fn: Callable
  predict: Callable
  embed: Callable
  mesh: Any
  config_dict: dict
  train_images: Any = None   # the dataset's splits, as `pipeline.DeviceImages` when kept on the device
  test_images: Any = None

  @property
  def scenario(self) -> scenario_lib.Scenario:
    return self.data.scenario

  @property
  def model(self):
    return self.method.model


@dataclasses.dataclass
class RunState:
  """The mutable state of a run: what the loop updates after each task and checkpoints."""
  train: TrainState
  frozen: Any
  method_state: dict
  memory: memory_lib.Memory
  steps: list


def make_embed_fn(predict, images):
  """`embed(params, batch_stats, indices, flip=False)`: embeddings of train images by index."""
  def embed(params, batch_stats, indices, flip=False):
    return predict(params, batch_stats, eval_lib._take(images, np.asarray(indices)), flip=flip)['embedding']
  return embed


def load_images(config, mesh) -> tuple:
  """(dataset, train_images, test_images): the data set of `config` and its splits placed by `data.on_device`
  (`pipeline.place_dataset`: one budget and one device copy for both). The runs of a group share them: they
  differ in seed and class order only (`runs.run_configs`), their images do not."""
  ds = sources.load_dataset(config.data)
  return (ds, *pipeline.place_dataset([ds.train_images, ds.test_images], mesh, config.data.on_device))


def build_run_spec(config, workdir: str, mesh, images: Optional[tuple] = None) -> RunSpec:
  """Loads the data of `config` (checked field by field by `validate.validate_config`), checks it against the
  data set and scenario, and builds the method with its networks: everything a run needs that never changes
  while it trains. `images`: `load_images(config, mesh)`, shared with other runs (default: loaded here)."""
  ds, train_images, test_images = load_images(config, mesh) if images is None else images
  data = prepare_data(config, ds)
  validate.validate_against_data(config, ds, data.scenario)
  method = build_method(config, data.scenario.num_classes, ds.image_shape)
  augment_fn = augment.make_augment_fn(config.data.augment, ds.mean, ds.std)
  preprocess = lambda images: augment.normalize(images, ds.mean, ds.std)
  predict = eval_lib.make_predict_fn(method.model, mesh, preprocess, int(config.eval.batch_size))
  return RunSpec(config=config, workdir=workdir, data=data, method=method, augment_fn=augment_fn, predict=predict,
                 embed=make_embed_fn(predict, train_images), mesh=mesh,
                 config_dict=json.loads(config.to_json_best_effort()), train_images=train_images,
                 test_images=test_images)


def initial_state(spec: RunSpec) -> RunState:
  train = init_train_state(spec.model, spec.mesh, make_optimizer(spec.config.optim))
  return RunState(train=train, frozen=None, method_state={}, memory=memory_lib.Memory(), steps=[])


# ---- checkpoints and result files -------------------------------------------------------------------------
@dataclasses.dataclass
class Resume:
  """Where a restored run continues: at task `start_task`, inside it after a mid-task checkpoint (`mid`: its
  'mid_task' metadata plus the restored `state`); `task_start_step` is the global step of the last task end."""
  start_task: int = 0
  mid: Optional[dict] = None
  task_start_step: Optional[int] = None


class RunStore:
  """The checkpoints and result files of one run's workdir."""

  def __init__(self, spec: RunSpec):
    self.spec = spec
    self.checkpointer = ckpt_lib.RunCheckpointer(os.path.join(spec.workdir, 'checkpoints'),
                                                 max_to_keep=spec.config.checkpoint.max_to_keep)
    self._pending: Optional[dict] = None   # results waiting for their task-end checkpoint to complete

  def restore(self, state: RunState) -> tuple[RunState, Resume]:
    """The latest checkpointed state of the workdir (or `state` when there is none) and where it resumes."""
    spec, checkpointer = self.spec, self.checkpointer
    latest = checkpointer.latest_step()
    if latest is None:
      _refuse_orphan_results(spec.workdir)
      return state, Resume()
    meta = checkpointer.restore_meta(latest)
    diffs = ckpt_lib.config_differences(meta['config'], spec.config_dict, cfglib.flat_defaults())
    if diffs:
      raise CheckpointError(
          f'{spec.workdir} holds a run with a different config; refusing to resume over it. Differences:\n  '
          + '\n  '.join(diffs[:20]) + '\nUse a new --workdir for a different run.')
    mid = meta.get(ckpt_lib.MID_TASK)
    task_start_step = mid['start_step'] if mid else latest
    if task_start_step is not None:
      if task_start_step not in checkpointer.all_steps():
        raise CheckpointError(
            f'mid-task checkpoint {latest} in {checkpointer.directory} needs the task-end checkpoint '
            f'{task_start_step}, which is missing. Delete {os.path.join(checkpointer.directory, str(latest))} '
            'to resume from the latest task-end checkpoint, or use a new --workdir.')
      train, frozen, method_state, mem_arr = checkpointer.restore(task_start_step, state.train, spec.mesh)
      state = RunState(train=train, frozen=frozen, method_state=method_state,
                       memory=memory_lib.Memory.from_array(mem_arr), steps=state.steps)
    if mid:
      mid = dict(mid, state=checkpointer.restore_train(latest, state.train, spec.mesh))
    state.steps = list(meta['steps'])
    return state, Resume(start_task=int(meta['task']) + 1, mid=mid, task_start_step=task_start_step)

  def task_meta(self, t: int, steps: list) -> dict:
    """Checkpoint metadata after task t (the steps recorded so far)."""
    return {'task': t, 'steps': list(steps), 'class_order': self.spec.scenario.order.tolist(),
            'config': self.spec.config_dict}

  def save_task_end(self, t: int, state: RunState) -> int:
    """Starts the task-end checkpoint of task t and returns its global step. The arrays are copied to the host
    before this returns; the files are written in the background while the next task trains (Orbax's next
    save, or `close`, waits for them)."""
    step = int(jax.device_get(state.train.step))
    self.checkpointer.save(step, state.train, state.frozen, state.method_state,
                           state.memory.to_array(self.spec.scenario.num_classes), self.task_meta(t, state.steps))
    return step

  def save_mid_task(self, train: TrainState, meta: dict) -> None:
    self.checkpointer.save_mid_task(int(jax.device_get(train.step)), train, meta)
    # Orbax's save returned once the previous one (the last task end's) was complete: its results can go out.
    self._write_pending()

  def results(self, steps: list, **extra) -> dict:
    spec = self.spec
    return {'method': spec.config.method.name, 'dataset': spec.data.dataset.name,
            'num_tasks': spec.scenario.num_tasks, 'class_order': spec.scenario.order.tolist(),
            'task_sizes': list(spec.scenario.sizes), 'config': spec.config_dict, **metrics_lib.summarize(steps),
            'steps': steps, 'environment': environment_lib.describe(), **extra}

  def write_results(self, results: dict, plots: bool = False) -> None:
    """results.json and results.csv (and the plots with `plots` and `config.plots`: once, at the run's end;
    `report` draws them on demand). Callers write only results whose tasks' checkpoints are complete."""
    if jax.process_index() == 0:
      metrics_lib.write_results(self.spec.workdir, results, plots=plots and bool(self.spec.config.plots))

  def results_when_saved(self, results: dict) -> None:
    """Writes `results` once the checkpoint just started (the task-end one of its last task) is complete: the
    results pending from the previous task are written now (the checkpoint started since waited for theirs),
    these at the end of the next phase that finds their checkpoint complete (`write_saved_results`), at the next
    call or at `close`. (Orbax's `save` returns only once the previous save is complete.)
    results.json thus never names a task whose checkpoint is incomplete, and no task end waits for its own
    checkpoint's files."""
    self._write_pending()
    self._pending = results

  def write_saved_results(self) -> None:
    """Writes the pending results now if their checkpoint is already complete (asked without waiting), so that
    results.json follows the task ends as soon as their files are written."""
    if self._pending is not None and not self.checkpointer.saving():
      self._write_pending()

  def close(self, write_pending: bool = False) -> None:
    """Waits for the checkpoint being written, then (with `write_pending`, when the run stops on an error)
    writes the results pending on it; `finish` writes the final ones instead."""
    self.checkpointer.close()
    if write_pending:
      self._write_pending()
    self._pending = None

  def _write_pending(self) -> None:
    """Writes the pending results, if any (their checkpoint is known complete), and forgets them."""
    pending, self._pending = self._pending, None
    if pending is not None:
      self.write_results(pending)


def _refuse_orphan_results(workdir: str) -> None:
  """A workdir whose results.json reports finished tasks but which has no checkpoint (deleted, or another
  tool's directory) is never silently started over: results.json is written only after the checkpoint of the
  tasks it reports is complete, so this cannot come from a crash."""
  path = paths.as_path(paths.join(workdir, 'results.json'))
  if not path.exists():
    return
  try:
    done = len(json.loads(path.read_text()).get('steps', []))
  except (OSError, ValueError, AttributeError):
    done = None
  if done != 0:
    what = f'results of {done} finished task(s)' if done else 'a results.json that is not from incremental_jax'
    raise CheckpointError(
        f'{workdir} holds {what} but no checkpoint to resume from (checkpoints/ is missing or empty); refusing '
        f'to start over and overwrite them. Use a new --workdir, or delete {path} to rerun from scratch.')


# ---- one run's task, host side ------------------------------------------------------------------------------
@dataclasses.dataclass
class _Run:
  """A run in the loop: its spec, store, state, resume point and TensorBoard logger (None when off)."""
  spec: RunSpec
  store: RunStore
  state: RunState
  resume: Resume
  tb: Optional[tensorboard.TensorBoardLogger] = None

  def context(self, t: int, trainer: train_lib.SubnetworkTrainer) -> TaskContext:
    spec, state = self.spec, self.state
    return TaskContext(config=spec.config, task=t, scenario=spec.scenario, train_images=spec.train_images,
                       train_labels=spec.data.train_labels, model=spec.model, state=state.train,
                       frozen=state.frozen, method_state=state.method_state, memory=state.memory, embed=spec.embed,
                       predict=spec.predict, mesh=spec.mesh, augment_fn=spec.augment_fn, workdir=spec.workdir,
                       trainer=trainer)

  def resume_in(self, t: int) -> Optional[dict]:
    mid = self.resume.mid
    return mid if mid is not None and mid['task'] == t else None


def update_memory(ctx: TaskContext, config) -> memory_lib.Memory:
  """iCaRL memory update after task t: shrink old classes to the new per-class budget, then select the new
  classes' exemplars from their train embeddings under the current model."""
  lo, hi = ctx.class_range()
  m = memory_lib.per_class_budget(config.memory, hi)
  memory = ctx.memory.reduced(m)
  # One inference pass over every new class (not one per class, each padded to eval.batch_size).
  new = ctx.new_class_indices()
  new_feats = ctx.embed(ctx.state.params, ctx.state.batch_stats, new)
  for c in range(lo, hi):
    faults.reached('exemplar_selection')
    of_c = ctx.train_labels[new] == c
    idx, feats = new[of_c], new_feats[of_c]
    pos = memory_lib.select_exemplars(feats, m, config.memory.selection, seed=config.seed + c)
    memory = memory.with_class(c, idx[pos])
  return memory_lib.Memory.from_array(parallel.broadcast_decision(memory.to_array(hi), 'herding', f'in task {ctx.task}'))


def nme_class_means(ctx: TaskContext, config) -> np.ndarray:
  """Class means of the exemplars (and of their second view `memory.nme_view` when `memory.nme_flip`)."""
  idx = ctx.memory.indices()
  labels = ctx.train_labels[idx]
  feats = ctx.embed(ctx.state.params, ctx.state.batch_stats, idx)
  flipped = None
  if config.memory.nme_flip:
    flipped = ctx.embed(ctx.state.params, ctx.state.batch_stats, idx, flip=config.memory.nme_view)
  return memory_lib.class_means(feats, labels, ctx.scenario.num_classes, flipped)


def phase_task_info(method, ctx: TaskContext, phase):
  """The `TaskInfo` of `phase` in task `ctx.task`: its trainable classes, by default the new ones when the
  method freezes old classes, else every seen one."""
  trainable = phase.trainable_classes
  if trainable is None:
    masks = ctx.scenario.class_masks(ctx.task)
    trainable = masks['new'] if method.freeze_old_classes else masks['seen']
  return make_task_info(ctx.scenario, ctx.task, trainable)


def end_task(run: _Run, ctx: TaskContext, epoch_losses: dict, t0: float, show_progress: bool) -> dict:
  """The `after_task` hook, evaluation, the task-end checkpoint and the result files; returns the step record."""
  spec, t = run.spec, ctx.task
  method, scenario = spec.method, spec.scenario
  ctx = method.after_task(ctx)
  train_seconds = time.time() - t0
  means = nme_class_means(ctx, spec.config) if method.uses_memory else None
  record = eval_lib.evaluate_task(spec.predict, ctx.state.params, ctx.state.batch_stats, spec.test_images,
                                  spec.data.test_labels, scenario, t, means)
  lo, hi = ctx.class_range()
  record.update(step=t, num_classes=hi, classes=scenario.order[lo:hi].tolist(), memory_size=len(ctx.memory),
                train_seconds=round(train_seconds, 3), epoch_losses=epoch_losses)
  run.state = RunState(train=ctx.state, frozen=ctx.frozen, method_state=ctx.method_state, memory=ctx.memory,
                       steps=run.state.steps + [record])
  run.resume.task_start_step = run.store.save_task_end(t, run.state)
  run.store.results_when_saved(run.store.results(run.state.steps, complete=t == scenario.num_tasks - 1))
  if run.tb is not None:
    run.tb.log_task(run.state.steps)
  if show_progress and jax.process_index() == 0:
    print(_step_line(record), flush=True)
  faults.reached('task_end')
  return record


# ---- phases of all runs of a task -----------------------------------------------------------------------
def run_phases(trainer: train_lib.Trainer, runs: list, ctxs: list, phase_lists: list, losses: list,
               resumes: Optional[list] = None, every: int = 0) -> list:
  """Trains the runs' phases in order, the i-th phases of all runs together, and returns the runs' contexts
  with their trained states; `losses[k]` gets run k's per-epoch losses by phase name.

  `resumes[k]` (a mid-task checkpoint's 'mid_task' entry plus its `state`, or None) makes run k skip the
  phases and epochs it covers. With `every` > 0, each run writes a mid-task checkpoint every `every` epochs
  (never after a phase's last epoch, whose state the task's next checkpoint supersedes)."""
  main, resumes = resumes is not None, resumes or [None] * len(runs)
  names = [[p.name for p in phases] for phases in phase_lists]
  if any(n != names[0] for n in names):
    raise RuntimeError(f'runs trained together must have the same phases; got {names}.')
  t, num_tasks = ctxs[0].task, ctxs[0].scenario.num_tasks
  for p_idx in range(len(names[0])):
    phases = [pl[p_idx] for pl in phase_lists]
    parts = [_phase_part(run, ctx, phase, p_idx, loss, resume)
             for run, ctx, phase, loss, resume in zip(runs, ctxs, phases, losses, resumes)]
    todo = [k for k, part in enumerate(parts) if part.start_epoch < int(part.phase.optim.epochs)]
    if not todo:
      continue
    # Runs trained together stay together (one vmapped step) even when one of them resumed past this phase:
    # its updates are discarded, and the others' numbers stay those of the uninterrupted group.
    desc = f'step {t}/{num_tasks - 1} {phases[0].name}' + (f' ({len(runs)} runs)' if len(runs) > 1 else '')
    on_epoch_end = None
    if every > 0 or main:   # the main phases checkpoint every `every` epochs, and when preempted
      on_epoch_end = lambda e, states, live, p_idx=p_idx, parts=parts: _save_mid_task(
          runs, parts, losses, every, t, p_idx, e, states, live, desc)
    start_steps = [int(jax.device_get(part.state.step)) for part in parts]
    results = train_lib.run_phase(trainer, parts, ctxs[0].train_images, desc, on_epoch_end)
    for k in todo:
      runs[k].store.write_saved_results()
      if runs[k].tb is not None:
        first = parts[k].start_epoch
        runs[k].tb.log_phase(t, phases[0].name, results[k].epoch_metrics[first:], start_steps[k],
                             int(jax.device_get(results[k].state.step)), first_epoch=first)
      check_finite(results[k].state, f'run {k} {desc}' if len(runs) > 1 else desc)
      losses[k][phases[0].name] = [round(m['loss'], 6) for m in results[k].epoch_metrics]
      ctxs[k] = ctxs[k].replace(state=results[k].state)
  return ctxs


def _phase_part(run: _Run, ctx: TaskContext, phase, p_idx: int, losses: dict,
                resume: Optional[dict]) -> train_lib.PhaseRun:
  """Run k's share of phase `p_idx`, started where its mid-task checkpoint `resume` left it."""
  state, start_epoch, history = ctx.state, 0, []
  if resume is not None:
    if p_idx < resume['phase']:
      start_epoch = int(phase.optim.epochs)   # done before the checkpoint
    elif p_idx == resume['phase']:
      if phase.name != resume['phase_name']:
        raise CheckpointError(
            f"the mid-task checkpoint was taken in phase {resume['phase_name']!r} but the method's phase "
            f'{p_idx} of task {ctx.task} is now {phase.name!r}; its hooks are not deterministic.')
      state, start_epoch = resume['state'], int(resume['epoch'])
      history = [{'loss': loss} for loss in resume['phase_losses']]
  config = run.spec.config
  return train_lib.PhaseRun(state=state, frozen=ctx.frozen, task=phase_task_info(run.spec.method, ctx, phase),
                            phase=phase, labels=run.spec.data.train_labels,
                            rng_seed=(int(config.seed), ctx.task, len(losses)), seed=int(config.seed),
                            start_epoch=start_epoch, history=history)


def _save_mid_task(runs: list, parts: list, losses: list, every: int, t: int, p_idx: int, e: int, states,
                   live: np.ndarray, desc: str) -> None:
  """After epoch e of main phase `p_idx` of task t: each run that trained in it writes a mid-task checkpoint
  every `every` epochs (never after a phase's last epoch)."""
  phase = parts[0].phase
  stop = preemption.requested()
  if e + 1 >= int(phase.optim.epochs) or not (stop or (every and (e + 1) % every == 0)):
    return   # (a stop after a phase's last epoch happens at the next boundary: the phase's end is no resume point)
  for run, part, loss, state, trained in zip(runs, parts, losses, states(), live):
    if not trained:
      continue
    check_finite(state, desc)
    mid = {'task': t, 'phase': p_idx, 'phase_name': phase.name, 'epoch': e + 1,
           'start_step': run.resume.task_start_step, 'epoch_losses': dict(loss),
           'phase_losses': [round(m['loss'], 6) for m in part.history]}
    run.store.save_mid_task(state, {**run.store.task_meta(t - 1, run.state.steps), ckpt_lib.MID_TASK: mid})
  if stop:
    _stop(runs, f"in step {t} (phase {phase.name!r}, epoch {e + 1})")


def _stop(runs: list, where: str) -> None:
  """Waits for the runs' checkpoints and raises `preemption.Preempted` saying where the run stopped."""
  for run in runs:
    run.store.checkpointer.wait()
  workdir = os.path.dirname(runs[0].spec.workdir) if len(runs) > 1 else runs[0].spec.workdir
  raise preemption.Preempted(preemption.message(workdir, where, runs[0].store.checkpointer.latest_step()))


# ---- the task loop --------------------------------------------------------------------------------------
def compilation_cache_dir(setting: str, environ=os.environ) -> str:
  """The persistent compilation cache directory of `config.compilation_cache` ('' = none): 'auto' is
  $XDG_CACHE_HOME/incremental_jax/xla (~/.cache/incremental_jax/xla); JAX_COMPILATION_CACHE_DIR, when set,
  is JAX's own setting and wins."""
  if environ.get('JAX_COMPILATION_CACHE_DIR') or not setting:
    return ''
  if setting == 'auto':
    return os.path.join(environment_lib.cache_dir(environ), 'xla')
  return os.path.abspath(os.path.expanduser(setting))


def use_compilation_cache(setting: str) -> None:
  """Points JAX's persistent compilation cache at `compilation_cache_dir(setting)`, also after this process
  compiled something else (the cache is re-opened). Every program is kept, however fast it compiled: the digits
  quick start compiles ~40 programs under JAX's default 1 s threshold, 1.3 s of a warm run when recompiled."""
  from jax.experimental.compilation_cache import compilation_cache
  path = compilation_cache_dir(setting)
  if not path or jax.config.jax_compilation_cache_dir == path:
    return
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  compilation_cache.reset_cache()


def open_run(config, workdir: str, mesh, show_progress: bool, images: Optional[tuple] = None) -> _Run:
  """Builds a run's spec (with `images`, see `build_run_spec`), opens its workdir and restores its latest
  checkpoint, if any."""
  spec = build_run_spec(config, workdir, mesh, images)
  store = RunStore(spec)
  state, resume = store.restore(initial_state(spec))
  if resume.start_task or resume.mid:
    if show_progress and jax.process_index() == 0:
      mid, latest = resume.mid, store.checkpointer.latest_step()
      where = (f"in step {mid['task']} (phase {mid['phase_name']!r}, epoch {mid['epoch']})" if mid else
               f'after step {resume.start_task - 1}')
      print(f'resuming {workdir} {where} of steps 0-{spec.scenario.num_tasks - 1} (checkpoint step {latest})',
            flush=True)
  return _Run(spec=spec, store=store, state=state, resume=resume,
              tb=tensorboard.make_logger(config, workdir, state.steps))


def train_and_evaluate(config, workdir: str, *, show_progress: Optional[bool] = None) -> dict:
  """Runs (or resumes) the incremental protocol of `config`, writing checkpoints and results into `workdir`.

  Returns the results dict that is also written to `workdir/results.json`; with `num_runs` > 1, the runs'
  summary that is also written to `workdir/summary.json` (each run's results are in `workdir/run_k/`). Every
  input is checked before any training (`validate`, the data set, the scenario, the checkpoint directory).
  With several processes (`jax.distributed`), every process calls this; only process 0 writes results, plots
  and progress.
  """
  show_progress = config.progress if show_progress is None else show_progress
  configs = runs_lib.run_configs(config)
  for c in configs:
    validate.validate_config(c)   # before anything starts (the mesh, data loading)
  use_compilation_cache(config.compilation_cache)
  group = len(configs) > 1
  workdirs = [os.path.join(workdir, f'run_{k}') for k in range(len(configs))] if group else [workdir]
  mesh = parallel.make_mesh()
  images = load_images(configs[0], mesh)   # one placed copy of the data set for every run
  runs = [open_run(c, w, mesh, show_progress and not group, images) for c, w in zip(configs, workdirs)]
  if show_progress and jax.process_index() == 0:
    print(startup.session_summary(runs, workdir, config), flush=True)
  lead = runs[0].spec
  trainer = train_lib.Trainer(lead.model, lead.method, mesh, lead.augment_fn, show_progress=show_progress)
  subnetworks = train_lib.SubnetworkTrainer(mesh, show_progress=bool(config.progress))
  every = int(config.checkpoint.every_epochs or 0)
  try:
    run_tasks(runs, trainer, subnetworks, every, show_progress)
  except BaseException:
    for r in runs:   # a task-end checkpoint may still be written: complete it, and report its task
      r.store.close(write_pending=True)
    raise
  compilations = {'compilations': trainer.compile_count}
  if subnetworks.compile_count:
    compilations['subnetwork_compilations'] = subnetworks.compile_count
  results = [finish(r, compilations, show_progress and not group) for r in runs]
  if not group:
    return results[0]
  summary = {**runs_lib.summarize_runs(results, workdirs), **compilations}
  runs_lib.write_summary(workdir, summary, show_progress)
  return summary


def run_tasks(runs: list, trainer: train_lib.Trainer, subnetworks: train_lib.SubnetworkTrainer, every: int,
              show_progress: bool) -> None:
  """The task loop of `runs` (trained together), from the first task any of them has left."""
  lead, group = runs[0].spec, len(runs) > 1
  for t in range(min(r.resume.start_task for r in runs), lead.scenario.num_tasks):
    t0 = time.time()
    active = [r for r in runs if r.resume.start_task <= t]
    ctxs = [r.spec.method.before_task(r.context(t, subnetworks)) for r in active]
    resumes = [r.resume_in(t) for r in active]
    losses = [dict(res['epoch_losses']) if res else {} for res in resumes]
    ctxs = run_phases(trainer, active, ctxs, [r.spec.method.phases(c) for r, c in zip(active, ctxs)], losses,
                      resumes, every)
    ctxs = [c.replace(memory=update_memory(c, r.spec.config)) if r.spec.method.uses_memory else c
            for r, c in zip(active, ctxs)]
    ctxs = run_phases(trainer, active, ctxs, [r.spec.method.balancing_phases(c) for r, c in zip(active, ctxs)],
                      losses)
    records = [end_task(r, c, l, t0, show_progress and not group) for r, c, l in zip(active, ctxs, losses)]
    if t + 1 < lead.scenario.num_tasks and preemption.requested():
      _stop(runs, f'after step {t}')
    if group and show_progress and jax.process_index() == 0:
      print(runs_lib.task_line(t, records), flush=True)


def finish(run: _Run, compilations: dict, show_progress: bool) -> dict:
  """Closes the run's checkpointer and writes its final results, with `compilations` (the numbers of compiled
  train steps: the run's own, and its method's sub-networks' when it trains any)."""
  run.store.close()
  if run.tb is not None:
    run.tb.close()
  results = run.store.results(run.state.steps, complete=True, **compilations)
  run.store.write_results(results, plots=True)
  if show_progress and jax.process_index() == 0:
    print(metrics_lib.format_summary(results), flush=True)
    print(f'results written to {os.path.join(run.spec.workdir, "results.json")}', flush=True)
  return results


def _step_line(record: dict) -> str:
  msg = f"step {record['step']}: {record['num_classes']} classes  CNN {record['cnn']['all']:.2f}%"
  if record.get('nme'):
    msg += f"  NME {record['nme']['all']:.2f}%"
  return msg
