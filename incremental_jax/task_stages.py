"""The stages of one task, for the runs trained together (one run, or a `num_runs` group): each takes the runs'
`TaskRun`s and returns new ones.

    begin_task       the method's `before_task` hook (e.g. imprinting, a teacher trained or loaded)
    train_stage      its phases ('main'), after the memory update its balancing phases ('balancing'); at every
                     epoch end a mid-task checkpoint when one is due (`checkpoint.every_epochs`) or a stop is
                     requested (SIGTERM), then the stop
    memory_stage     iCaRL's exemplar update (methods with a memory)
    after_stage      the `after_task` hook (e.g. a teacher snapshot, M2KD's pruned snapshot)
    end_task         evaluation (CNN, NME), the task-end checkpoint, results.json once it is complete

A task resumed from a mid-task checkpoint (`RunState.cursor.in_task`) runs its hooks again from the task-start
state (they are deterministic) and skips the epochs, the memory update and the phases the checkpoint covers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Optional

import jax

from incremental_jax import evaluate as eval_lib
from incremental_jax import faults
from incremental_jax import memory as memory_lib
from incremental_jax import preemption
from incremental_jax import train as train_lib
from incremental_jax.errors import CheckpointError
from incremental_jax.method_store import MethodStore
from incremental_jax.methods.base import TaskContext
from incremental_jax.run_spec import RunSpec
from incremental_jax.run_state import AFTER, BALANCING, MAIN, Cursor, InTask, RunState
from incremental_jax.step import check_finite, make_task_info
from incremental_jax.store import Pending, RunStore

STAGES = (MAIN, BALANCING, AFTER)


@dataclasses.dataclass(frozen=True)
class TaskRun:
  """One run inside task `ctx.task`: its spec and store, its `state` at the task's start (`cursor.in_task`: how
  far a resumed task went), the hooks' context (whose train state, teacher and memory advance stage by stage), the
  per-epoch losses of the task's finished phases, results waiting for their checkpoint, and the task's start."""
  spec: RunSpec
  store: RunStore
  state: RunState
  ctx: TaskContext
  losses: tuple = ()
  pending: Optional[Pending] = None
  started: float = 0.0

  def replace(self, **changes) -> 'TaskRun':
    return dataclasses.replace(self, **changes)

  def save_in_task(self, in_task: InTask) -> None:
    """Writes a mid-task checkpoint: the task-start state with how far the task went."""
    self.store.save(self.state.replace(cursor=dataclasses.replace(self.state.cursor, in_task=in_task)))

  def resumed_at(self, stage: str) -> bool:
    """Whether the task resumed at `stage` or a later one."""
    in_task = self.state.cursor.in_task
    return in_task is not None and STAGES.index(in_task.stage) >= STAGES.index(stage)


def context(spec: RunSpec, state: RunState, t: int, subnetworks) -> TaskContext:
  """The hooks' view of task t, from the task-start state."""
  return TaskContext(config=spec.config, task=t, scenario=spec.scenario, train_images=spec.train_images,
                     train_labels=spec.data.train_labels, model=spec.model, state=state.train, frozen=state.frozen,
                     method_state=state.method_state, memory=state.memory, embed=spec.embed, predict=spec.predict,
                     mesh=spec.mesh, augment_fn=spec.augment_fn, store=MethodStore(spec.workdir), trainer=subnetworks)


def begin_task(spec: RunSpec, store: RunStore, state: RunState, t: int, subnetworks,
               pending: Optional[Pending]) -> TaskRun:
  """Task t's `TaskRun` after the `before_task` hook; a resumed task starts from the losses its checkpoint kept."""
  in_task = state.cursor.in_task
  started = time.time()
  ctx = spec.method.before_task(context(spec, state, t, subnetworks))
  return TaskRun(spec=spec, store=store, state=state, ctx=ctx, losses=in_task.losses if in_task else (),
                 pending=pending, started=started)


def phase_task_info(method, ctx: TaskContext, phase):
  """The `TaskInfo` of `phase` in task `ctx.task`: its trainable classes, by default the new ones when the
  method freezes old classes, else every seen one, and the method's traced hyperparameters."""
  trainable = phase.trainable_classes
  if trainable is None:
    masks = ctx.scenario.class_masks(ctx.task)
    trainable = masks['new'] if method.freeze_old_classes else masks['seen']
  return make_task_info(ctx.scenario, ctx.task, trainable).replace(hparams=method.hyperparameter_values())


def phase_run(run: TaskRun, phase, stage: str, p_idx: int) -> train_lib.PhaseRun:
  """The run's share of phase `p_idx` of `stage`, started where its mid-task checkpoint left it: a phase the
  checkpoint covers is skipped, the phase it was taken in starts at its epoch with its train state."""
  ctx, config, in_task = run.ctx, run.spec.config, run.state.cursor.in_task
  state, start_epoch, history = ctx.state, 0, ()
  if in_task is not None and run.resumed_at(stage):
    here = in_task.stage == stage
    if not here or p_idx < in_task.phase:
      start_epoch = int(phase.optim.epochs)   # done before the checkpoint
    elif p_idx == in_task.phase:
      if phase.name != in_task.phase_name:
        raise CheckpointError(
            f"the mid-task checkpoint was taken in phase {in_task.phase_name!r} but the method's phase "
            f'{p_idx} of task {ctx.task} is now {phase.name!r}; its hooks are not deterministic.')
      state, start_epoch = in_task.train, in_task.epoch
      history = tuple({'loss': loss} for loss in in_task.phase_losses)
  return train_lib.PhaseRun(state=state, frozen=ctx.frozen, task=phase_task_info(run.spec.method, ctx, phase),
                            phase=phase, labels=run.spec.data.train_labels,
                            rng_seed=(int(config.seed), ctx.task, len(run.losses)), seed=int(config.seed),
                            start_epoch=start_epoch, history=history)


def train_stage(trainer: train_lib.Trainer, runs: list, stage: str, phase_lists: list, every: int) -> list:
  """Trains the runs' phases of `stage` in order, the i-th phases of all runs together (one vmapped step), and
  returns the runs with their trained states and losses. After each epoch but a phase's last: a mid-task
  checkpoint of each run that trained in it every `every` epochs or when a stop is requested, then
  `preemption.StopRequested`."""
  names = [[p.name for p in phases] for phases in phase_lists]
  if any(n != names[0] for n in names):
    raise RuntimeError(f'runs trained together must have the same phases; got {names}.')
  t, num_tasks = runs[0].ctx.task, runs[0].spec.scenario.num_tasks
  for p_idx, name in enumerate(names[0]):
    phases = [pl[p_idx] for pl in phase_lists]
    parts = [phase_run(run, phase, stage, p_idx) for run, phase in zip(runs, phases)]
    epochs = int(phases[0].optim.epochs)
    todo = [k for k, part in enumerate(parts) if part.start_epoch < epochs]
    if not todo:
      continue
    # Runs trained together stay together (one vmapped step) even when one of them resumed past this phase:
    # its updates are discarded, and the others' numbers stay those of the uninterrupted group.
    desc = f'step {t}/{num_tasks - 1} {name}' + (f' ({len(runs)} runs)' if len(runs) > 1 else '')
    start_steps = [int(jax.device_get(part.state.step)) for part in parts]
    last = None
    with contextlib.closing(train_lib.phase_epochs(trainer, parts, runs[0].ctx.train_images, desc)) as ends:
      for end in ends:
        last, histories = end, end.histories
        stop = preemption.requested()
        # A phase's end is no resume point (the next checkpoint supersedes it): a stop requested there is honoured
        # at the next boundary.
        if end.epoch + 1 >= epochs or not (stop or (every and (end.epoch + 1) % every == 0)):
          continue
        states = end.states()
        for k, run in enumerate(runs):
          if end.live[k]:
            check_finite(states[k], desc)
            run.save_in_task(InTask(stage=stage, phase=p_idx, phase_name=name, epoch=end.epoch + 1, train=states[k],
                                    losses=run.losses, phase_losses=_epoch_losses(histories[k]),
                                    memory=None if stage == MAIN else run.ctx.memory))
        # Orbax's save waited for the one before: the results pending on it can go out.
        runs = [run.replace(pending=run.store.publish(run.pending, just_saved=True)) if end.live[k] else run
                for k, run in enumerate(runs)]
        if stop:
          raise preemption.StopRequested(f'in step {t} (phase {name!r}, epoch {end.epoch + 1})')
    states = last.states()   # after the last epoch: no step donates them any more
    runs = [run.replace(pending=run.store.publish(run.pending)) for run in runs]
    for k in todo:
      run = runs[k]
      if run.store.tb is not None:
        first = parts[k].start_epoch
        run.store.tb.log_phase(t, name, histories[k][first:], start_steps[k], int(jax.device_get(states[k].step)),
                               first_epoch=first)
      check_finite(states[k], f'run {k} {desc}' if len(runs) > 1 else desc)
      runs[k] = run.replace(ctx=run.ctx.replace(state=states[k]),
                            losses=run.losses + ((name, _epoch_losses(histories[k])),))
  return runs


def _epoch_losses(history) -> tuple:
  """The per-epoch mean losses of a phase's history, as results.json records them."""
  return tuple(round(m['loss'], 6) for m in history)


def memory_stage(run: TaskRun) -> TaskRun:
  """iCaRL's memory update of a method with a memory (the one its checkpoint holds when the task resumed after
  it)."""
  spec, ctx = run.spec, run.ctx
  if not spec.method.uses_memory:
    return run
  if run.resumed_at(BALANCING):
    return run.replace(ctx=ctx.replace(memory=run.state.cursor.in_task.memory))
  lo, hi = ctx.class_range()
  embed = lambda idx: spec.embed(ctx.state.params, ctx.state.batch_stats, idx)
  memory = memory_lib.update_memory(ctx.memory, embed, ctx.train_labels, ctx.new_class_indices(), range(lo, hi),
                                    spec.config.memory, int(spec.config.seed), f'in task {ctx.task}')
  return run.replace(ctx=ctx.replace(memory=memory))


def after_stage(runs: list) -> list:
  """The runs' `after_task` hooks. A stop requested while one trains a network of its own (M2KD's pruned
  snapshot) first saves each run's mid-task checkpoint with every phase done, so that a resumed task only runs
  the hooks again."""
  runs = [run if not run.resumed_at(AFTER) else run.replace(ctx=run.ctx.replace(
      state=run.state.cursor.in_task.train, memory=run.state.cursor.in_task.memory)) for run in runs]
  try:
    return [run.replace(ctx=run.spec.method.after_task(run.ctx)) for run in runs]
  except preemption.StopRequested:
    for run in (r for r in runs if not r.resumed_at(AFTER)):   # (a resumed one has this checkpoint already)
      run.save_in_task(InTask(stage=AFTER, phase=0, phase_name='', epoch=0, train=run.ctx.state, losses=run.losses,
                              memory=run.ctx.memory))
    raise


def end_task(run: TaskRun, show_progress: bool) -> tuple[RunState, Optional[Pending]]:
  """Evaluation, the task-end checkpoint and the result files of the task; returns the state at the next task's
  start and the results waiting for its checkpoint."""
  spec, ctx, t = run.spec, run.ctx, run.ctx.task
  train_seconds = time.time() - run.started
  means = None
  if spec.method.uses_memory:
    embed = lambda idx, flip: spec.embed(ctx.state.params, ctx.state.batch_stats, idx, flip=flip)
    means = memory_lib.exemplar_class_means(ctx.memory, embed, ctx.train_labels, spec.scenario.num_classes,
                                            spec.config.memory)
  record = eval_lib.evaluate_task(spec.predict, ctx.state.params, ctx.state.batch_stats, spec.test_images,
                                  spec.data.test_labels, spec.scenario, t, means)
  lo, hi = ctx.class_range()
  record.update(step=t, num_classes=hi, classes=spec.scenario.order[lo:hi].tolist(), memory_size=len(ctx.memory),
                train_seconds=round(train_seconds, 3), epoch_losses={k: list(v) for k, v in run.losses})
  state = RunState(train=ctx.state, frozen=ctx.frozen, method_state=ctx.method_state, memory=ctx.memory,
                   records=run.state.records + (record,), cursor=Cursor(task=t + 1))
  state = run.store.save(state)
  run.store.publish(run.pending, just_saved=True)
  if run.store.tb is not None:
    run.store.tb.log_task(list(state.records))
  if show_progress and jax.process_index() == 0:
    print(_task_line(record), flush=True)
  faults.reached('task_end')
  return state, Pending(step=state.cursor.task_start_step, records=state.records)


def _task_line(record: dict) -> str:
  msg = f"step {record['step']}: {record['num_classes']} classes  CNN {record['cnn']['all']:.2f}%"
  if record.get('nme'):
    msg += f"  NME {record['nme']['all']:.2f}%"
  return msg
