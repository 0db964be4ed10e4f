"""A whole class-incremental run: `train_and_evaluate(config, workdir) -> results`.

For each task: the method's hooks and phases (see `methods.base`), the exemplar memory update, evaluation
(CNN and NME), a checkpoint, and the result files. Running it again on the same workdir resumes after the
last completed task and produces the same results as an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Optional

import jax
import numpy as np

from incremental_jax import checkpoint as ckpt_lib
from incremental_jax import evaluate as eval_lib
from incremental_jax import faults
from incremental_jax import memory as memory_lib
from incremental_jax import metrics as metrics_lib
from incremental_jax import parallel
from incremental_jax import startup
from incremental_jax import tensorboard
from incremental_jax import train as train_lib
from incremental_jax import validate
from incremental_jax.data import augment, scenario as scenario_lib, sources
from incremental_jax.methods import build_method
from incremental_jax.methods.base import TaskContext


@dataclasses.dataclass
class RunData:
  """The data of a run with labels remapped to class-order positions."""
  dataset: sources.Dataset
  scenario: scenario_lib.Scenario
  train_labels: np.ndarray
  test_labels: np.ndarray


def prepare_data(config) -> RunData:
  dataset = sources.load_dataset(config.data)
  scenario = scenario_lib.make_scenario(dataset.num_classes, config.data)
  return RunData(dataset, scenario, scenario.remap(dataset.train_labels), scenario.remap(dataset.test_labels))


def make_embed_fn(predict, images):
  """`embed(params, batch_stats, indices, flip=False)`: embeddings of train images by index."""
  def embed(params, batch_stats, indices, flip=False):
    return predict(params, batch_stats, eval_lib._take(images, np.asarray(indices)), flip=flip)['embedding']
  return embed


def update_memory(ctx: TaskContext, config) -> memory_lib.Memory:
  """iCaRL memory update after task t: shrink old classes to the new per-class budget, then select the new
  classes' exemplars from their train embeddings under the current model."""
  lo, hi = ctx.class_range()
  m = memory_lib.per_class_budget(config.memory, hi)
  memory = ctx.memory.reduced(m)
  for c in range(lo, hi):
    faults.reached('exemplar_selection')
    idx = np.flatnonzero(ctx.train_labels == c)
    feats = ctx.embed(ctx.state.params, ctx.state.batch_stats, idx)
    pos = memory_lib.select_exemplars(feats, m, config.memory.get('selection', 'herding'), seed=config.seed + c)
    memory = memory.with_class(c, idx[pos])
  return memory


def nme_class_means(ctx: TaskContext, config) -> np.ndarray:
  """Class means of the exemplars (and of their flipped copies when `memory.nme_flip`)."""
  idx = ctx.memory.indices()
  labels = ctx.train_labels[idx]
  feats = ctx.embed(ctx.state.params, ctx.state.batch_stats, idx)
  flipped = ctx.embed(ctx.state.params, ctx.state.batch_stats, idx, flip=True) if config.memory.get('nme_flip', True) else None
  return memory_lib.class_means(feats, labels, ctx.scenario.num_classes, flipped)


def phase_task_info(method, ctx: TaskContext, phase):
  """The `TaskInfo` of `phase` in task `ctx.task`: its trainable classes, by default the new ones when the
  method freezes old classes, else every seen one."""
  trainable = phase.trainable_classes
  if trainable is None:
    masks = ctx.scenario.class_masks(ctx.task)
    trainable = masks['new'] if method.freeze_old_classes else masks['seen']
  return train_lib.make_task_info(ctx.scenario, ctx.task, trainable)


class RunSession:
  """One run of the protocol in `workdir`: its data, method, model, checkpoints and results, and the steps of
  its task loop (`begin_task`, `update_memory`, `end_task`, `finish`). `train_and_evaluate` drives one session;
  `runs.train_and_evaluate_runs` drives several in lockstep and trains their phases together.

  Construction checks every input before any training (`validate`, the data set, the scenario, the checkpoint
  directory) and restores the latest checkpoint of `workdir`, if any: training resumes at `start_task` (and,
  after a mid-task checkpoint, inside it: `mid`).
  """

  def __init__(self, config, workdir: str, show_progress: bool, mesh=None):
    validate.validate_config(config)
    self.config, self.workdir, self.show_progress = config, workdir, show_progress
    self.is_main = jax.process_index() == 0
    self.data = data = prepare_data(config)
    self.scenario, ds = data.scenario, data.dataset
    validate.validate_against_data(config, ds, self.scenario)
    self.mesh = mesh = parallel.make_mesh() if mesh is None else mesh
    self.method = build_method(config)
    self.model = self.method.build_model(self.scenario.num_classes, ds.image_shape)
    self.aug_fn = augment.make_augment_fn(config.data.augment, ds.mean, ds.std)
    preprocess = lambda images: augment.normalize(images, ds.mean, ds.std)
    self.predict = eval_lib.make_predict_fn(self.model, mesh, preprocess, int(config.eval.batch_size))
    self.embed = make_embed_fn(self.predict, ds.train_images)
    self.trainer = train_lib.Trainer(self.model, self.method, mesh, self.aug_fn, seed=config.seed,
                                     show_progress=show_progress)
    self.state = train_lib.init_train_state(self.model, mesh, train_lib.make_optimizer(config.optim))
    self.frozen, self.method_state, self.memory, self.steps = None, {}, memory_lib.Memory(), []
    self.checkpointer = ckpt_lib.RunCheckpointer(os.path.join(workdir, 'checkpoints'),
                                                 max_to_keep=config.checkpoint.get('max_to_keep', 2))
    self.config_dict = json.loads(config.to_json_best_effort())
    self.start_task, self.mid, self.task_start_step = 0, None, None
    self._restore()
    self.tb = tensorboard.make_logger(config, workdir, self.steps)
    if self.is_main and show_progress:
      print(startup.session_summary([self], workdir, config), flush=True)
    self.base_results = {'method': config.method.name, 'dataset': ds.name, 'num_tasks': self.scenario.num_tasks,
                         'class_order': self.scenario.order.tolist(), 'task_sizes': list(self.scenario.sizes),
                         'config': self.config_dict}

  def _restore(self) -> None:
    checkpointer, workdir, mesh = self.checkpointer, self.workdir, self.mesh
    latest = checkpointer.latest_step()
    if latest is None:
      _refuse_orphan_results(workdir)
      return
    meta = checkpointer.restore_meta(latest)
    diffs = ckpt_lib.config_differences(meta['config'], self.config_dict)
    if diffs:
      raise ckpt_lib.CheckpointError(
          f'{workdir} holds a run with a different config; refusing to resume over it. Differences:\n  '
          + '\n  '.join(diffs[:20]) + '\nUse a new --workdir for a different run.')
    mid = meta.get(ckpt_lib.MID_TASK)
    self.task_start_step = mid['start_step'] if mid else latest
    if self.task_start_step is not None:
      if self.task_start_step not in checkpointer.all_steps():
        raise ckpt_lib.CheckpointError(
            f'mid-task checkpoint {latest} in {checkpointer.directory} needs the task-end checkpoint '
            f'{self.task_start_step}, which is missing. Delete {os.path.join(checkpointer.directory, str(latest))} '
            'to resume from the latest task-end checkpoint, or use a new --workdir.')
      self.state, self.frozen, self.method_state, mem_arr = checkpointer.restore(self.task_start_step, self.state,
                                                                                 mesh)
      self.memory = memory_lib.Memory.from_array(mem_arr)
    if mid:
      self.mid = dict(mid, state=checkpointer.restore_train(latest, self.state, mesh))
    self.steps, self.start_task = list(meta['steps']), int(meta['task']) + 1
    if self.is_main and self.show_progress:
      where = (f"in task {mid['task'] + 1} (phase {mid['phase_name']!r}, epoch {mid['epoch']})" if mid else
               f'after task {self.start_task}')
      print(f'resuming {workdir} {where} of {self.scenario.num_tasks} (checkpoint step {latest})', flush=True)

  def begin_task(self, t: int) -> TaskContext:
    """The context of task t after the method's `before_task` hook."""
    ds = self.data.dataset
    ctx = TaskContext(config=self.config, task=t, scenario=self.scenario, train_images=ds.train_images,
                      train_labels=self.data.train_labels, model=self.model, state=self.state, frozen=self.frozen,
                      method_state=self.method_state, memory=self.memory, embed=self.embed, predict=self.predict,
                      mesh=self.mesh, augment_fn=self.aug_fn, workdir=self.workdir)
    return self.method.before_task(ctx)

  def update_memory(self, ctx: TaskContext) -> TaskContext:
    return dataclasses.replace(ctx, memory=update_memory(ctx, self.config)) if self.method.uses_memory else ctx

  def end_task(self, ctx: TaskContext, epoch_losses: dict, t0: float) -> dict:
    """The `after_task` hook, evaluation, the task-end checkpoint and the result files; returns the step record."""
    config, scenario, ds, t = self.config, self.scenario, self.data.dataset, ctx.task
    ctx = self.method.after_task(ctx)
    train_seconds = time.time() - t0
    means = nme_class_means(ctx, config) if self.method.uses_memory else None
    record = eval_lib.evaluate_task(self.predict, ctx.state.params, ctx.state.batch_stats, ds.test_images,
                                    self.data.test_labels, scenario, t, means)
    lo, hi = ctx.class_range()
    record.update(step=t, num_classes=hi, classes=scenario.order[lo:hi].tolist(), memory_size=len(ctx.memory),
                  train_seconds=round(train_seconds, 3), epoch_losses=epoch_losses)
    self.steps.append(record)
    self.state, self.frozen, self.method_state, self.memory = ctx.state, ctx.frozen, ctx.method_state, ctx.memory
    self.task_start_step = int(jax.device_get(self.state.step))
    self.checkpointer.save(self.task_start_step, self.state, self.frozen, self.method_state,
                           self.memory.to_array(scenario.num_classes), self.task_meta(t))
    self.checkpointer.wait()  # results.json never reports a task whose checkpoint is incomplete
    results = {**self.base_results, **metrics_lib.summarize(self.steps), 'steps': self.steps,
               'complete': t == scenario.num_tasks - 1}
    if self.is_main:
      metrics_lib.write_results(self.workdir, results, plots=config.get('plots', True))
      _print_step(record, config, self.show_progress)
    if self.tb is not None:
      self.tb.log_task(self.steps)
    faults.reached('task_end')
    return record

  def task_meta(self, t: int) -> dict:
    """Checkpoint metadata after task t (the steps recorded so far)."""
    return {'task': t, 'steps': list(self.steps), 'class_order': self.scenario.order.tolist(),
            'config': self.config_dict}

  def finish(self, compilations: int) -> dict:
    """Closes the checkpointer and writes the final results (with the number of compiled train steps)."""
    self.checkpointer.close()
    if self.tb is not None:
      self.tb.close()
    results = {**self.base_results, **metrics_lib.summarize(self.steps), 'steps': self.steps, 'complete': True,
               'compilations': compilations}
    if self.is_main:
      metrics_lib.write_results(self.workdir, results, plots=self.config.get('plots', True))
      if self.show_progress:
        print(metrics_lib.format_summary(results), flush=True)
        print(f'results written to {os.path.join(self.workdir, "results.json")}', flush=True)
    return results


def train_and_evaluate(config, workdir: str, *, show_progress: Optional[bool] = None) -> dict:
  """Runs (or resumes) the incremental protocol of `config`, writing checkpoints and results into `workdir`.

  Returns the results dict that is also written to `workdir/results.json`. Every input is checked before any
  training (`validate`, the data set, the scenario, the checkpoint directory). With several processes
  (`jax.distributed`), every process calls this; only process 0 writes results, plots and progress. With
  `num_runs` > 1 the runs are trained together (`runs.train_and_evaluate_runs`) and the summary is returned.
  """
  show_progress = config.get('progress', True) if show_progress is None else show_progress
  if int(config.get('num_runs', 1)) > 1:
    from incremental_jax import runs
    return runs.train_and_evaluate_runs(config, workdir, show_progress=show_progress)
  s = RunSession(config, workdir, show_progress)
  every = int(config.checkpoint.get('every_epochs', 0) or 0)
  for t in range(s.start_task, s.scenario.num_tasks):
    t0 = time.time()
    ctx = s.begin_task(t)
    resume = s.mid if s.mid is not None and s.mid['task'] == t else None
    epoch_losses = dict(resume['epoch_losses']) if resume else {}
    save_mid = None
    if every > 0:
      save_mid = functools.partial(_save_mid_task, s.checkpointer, every, t, s.task_start_step, s.task_meta(t - 1))
    ctx, epoch_losses = _run_phases(s.trainer, s.method, ctx, s.method.phases(ctx), s.data, epoch_losses,
                                    on_epoch_end=save_mid, resume=resume, logger=s.tb)
    ctx = s.update_memory(ctx)
    ctx, epoch_losses = _run_phases(s.trainer, s.method, ctx, s.method.balancing_phases(ctx), s.data, epoch_losses,
                                    logger=s.tb)
    s.end_task(ctx, epoch_losses, t0)
  return s.finish(s.trainer.compile_count)


def _refuse_orphan_results(workdir: str) -> None:
  """A workdir whose results.json reports finished tasks but which has no checkpoint (deleted, or another
  tool's directory) is never silently started over: results.json is written only after the checkpoint of the
  tasks it reports is complete, so this cannot come from a crash."""
  path = os.path.join(workdir, 'results.json')
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      done = len(json.load(f).get('steps', []))
  except (OSError, ValueError, AttributeError):
    done = None
  if done != 0:
    what = f'results of {done} finished task(s)' if done else 'a results.json that is not from incremental_jax'
    raise ckpt_lib.CheckpointError(
        f'{workdir} holds {what} but no checkpoint to resume from (checkpoints/ is missing or empty); refusing '
        f'to start over and overwrite them. Use a new --workdir, or delete {path} to rerun from scratch.')


def _save_mid_task(checkpointer, every: int, t: int, task_start_step, base_meta: dict, p_idx: int, phase,
                   e: int, state, epoch_losses: dict, history: list) -> None:
  """After epoch e of main phase `p_idx` of task t: a mid-task checkpoint every `every` epochs (never after a
  phase's last epoch, whose state the task's next checkpoint supersedes)."""
  if (e + 1) % every or e + 1 >= int(phase.optim.epochs):
    return
  train_lib.check_finite(state, f'task {t + 1} {phase.name}')
  mid = {'task': t, 'phase': p_idx, 'phase_name': phase.name, 'epoch': e + 1, 'start_step': task_start_step,
         'epoch_losses': dict(epoch_losses), 'phase_losses': [round(m['loss'], 6) for m in history]}
  checkpointer.save_mid_task(int(jax.device_get(state.step)), state, {**base_meta, ckpt_lib.MID_TASK: mid})


def _run_phases(trainer, method, ctx: TaskContext, phases, data: RunData, epoch_losses: dict,
                on_epoch_end=None, resume: Optional[dict] = None, logger=None):
  """Trains `phases` in order. `on_epoch_end(p_idx, phase, e, state, epoch_losses, history)` after each epoch;
  `resume` (a mid-task checkpoint's `mid_task` entry plus its `state`) skips the phases and epochs it covers;
  `logger` (a `tensorboard.TensorBoardLogger`) gets each trained epoch's metrics."""
  state = ctx.state
  for p_idx, phase in enumerate(phases):
    start_epoch, history = 0, []
    if resume is not None:
      if p_idx < resume['phase']:
        continue
      if p_idx == resume['phase']:
        if phase.name != resume['phase_name']:
          raise ckpt_lib.CheckpointError(
              f"the mid-task checkpoint was taken in phase {resume['phase_name']!r} but the method's phase "
              f'{p_idx} of task {ctx.task} is now {phase.name!r}; its hooks are not deterministic.')
        state, start_epoch = resume['state'], int(resume['epoch'])
        history = [{'loss': loss} for loss in resume['phase_losses']]
    task_info = phase_task_info(method, ctx, phase)
    desc = f'task {ctx.task + 1}/{ctx.scenario.num_tasks} {phase.name}'
    callback = None
    if on_epoch_end is not None:
      callback = functools.partial(_epoch_callback, on_epoch_end, p_idx, phase, epoch_losses, history)
    start_step = int(jax.device_get(state.step))
    result = trainer.run_phase(state, ctx.frozen, task_info, phase, ctx.train_images, data.train_labels,
                               rng_seed=(int(ctx.config.seed), ctx.task, len(epoch_losses)), desc=desc,
                               on_epoch_end=callback, start_epoch=start_epoch, history=history)
    state = result.state
    if logger is not None:
      logger.log_phase(ctx.task, phase.name, result.epoch_metrics[start_epoch:], start_step,
                       int(jax.device_get(state.step)), first_epoch=start_epoch)
    train_lib.check_finite(state, desc)
    epoch_losses[phase.name] = [round(m['loss'], 6) for m in result.epoch_metrics]
  return dataclasses.replace(ctx, state=state), epoch_losses


def _epoch_callback(on_epoch_end, p_idx, phase, epoch_losses, history, e, state):
  on_epoch_end(p_idx, phase, e, state, epoch_losses, history)


def _print_step(record: dict, config, show_progress: bool) -> None:
  if not show_progress:
    return
  msg = f"step {record['step']}: {record['num_classes']} classes  CNN {record['cnn']['all']:.2f}%"
  if record.get('nme'):
    msg += f"  NME {record['nme']['all']:.2f}%"
  print(msg, flush=True)
