"""A run's workdir: its checkpoints (the codec between a `RunState` and Orbax items), its result files
(results.json/csv, plots) and its TensorBoard events.

- `save(state)` writes the state as a task-end checkpoint (at the start of a task: `cursor.in_task` is None) or a
  mid-task one, and returns it with `cursor.task_start_step` set after a task end; `restore(initial)` reads the
  latest back (or returns `initial` for a new workdir), refusing a workdir of another config or format.
- results.json never names a task whose checkpoint is not complete in storage: the loop hands `publish` the
  records of a task end (`Pending`) once the checkpoint after it has started (Orbax's next save waits for the one
  before), and after an error `publish_saved` writes the records of the latest complete task-end checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Optional

import jax

from incremental_jax import checkpoint as ckpt_lib
from incremental_jax import config as cfglib
from incremental_jax import environment as environment_lib
from incremental_jax import metrics as metrics_lib
from incremental_jax import paths
from incremental_jax import tensorboard
from incremental_jax.errors import CheckpointError
from incremental_jax.memory import Memory
from incremental_jax.run_state import MAIN, Cursor, InTask, RunState


@dataclasses.dataclass(frozen=True)
class Pending:
  """Records waiting for their task-end checkpoint `step` to be complete before results.json reports them."""
  step: int
  records: tuple


class RunStore:
  """The checkpoints, result files and TensorBoard events of one run's workdir (`spec.workdir`)."""

  def __init__(self, spec):
    self.spec = spec
    self.checkpointer = ckpt_lib.RunCheckpointer(paths.join(spec.workdir, 'checkpoints'),
                                                 max_to_keep=spec.config.checkpoint.max_to_keep)
    self.tb = tensorboard.make_logger(spec.config, spec.workdir)

  # ---- checkpoints --------------------------------------------------------------------------------------
  def restore(self, initial: RunState) -> RunState:
    """The state of the workdir's latest checkpoint (`initial` when there is none)."""
    spec, checkpointer = self.spec, self.checkpointer
    latest = checkpointer.latest_step()
    if latest is None:
      _refuse_orphan_results(spec.workdir)
      return initial
    meta = checkpointer.restore_meta(latest)
    mid = meta.get(ckpt_lib.MID_TASK)
    task_start_step = mid['start_step'] if mid else latest
    self._check_compatible(meta, latest, task_start_step)
    state = initial.replace(records=tuple(meta['steps']))
    if task_start_step is not None:
      if task_start_step not in checkpointer.all_steps():
        raise CheckpointError(
            f'mid-task checkpoint {latest} in {checkpointer.directory} needs the task-end checkpoint '
            f'{task_start_step}, which is missing. Delete {paths.join(checkpointer.directory, str(latest))} '
            'to resume from the latest task-end checkpoint, or use a new --workdir.')
      train, frozen, method_state, memory = checkpointer.restore(task_start_step, initial.train, spec.mesh)
      state = state.replace(train=train, frozen=frozen, method_state=method_state, memory=Memory.from_array(memory))
    in_task = None
    if mid:
      train, memory = checkpointer.restore_mid_task(latest, initial.train, spec.mesh)
      in_task = InTask(stage=mid.get('stage', MAIN), phase=int(mid['phase']), phase_name=mid['phase_name'],
                       epoch=int(mid['epoch']), train=train,
                       losses=tuple((k, tuple(v)) for k, v in mid['epoch_losses'].items()),
                       phase_losses=tuple(mid['phase_losses']),
                       memory=None if memory is None else Memory.from_array(memory))
    return state.replace(cursor=Cursor(task=int(meta['task']) + 1, task_start_step=task_start_step, in_task=in_task))

  def _check_compatible(self, meta: dict, step: int, task_start_step: Optional[int]) -> None:
    """Refuses a checkpoint of another config (fields removed since it was written are ignored, with one line)
    or with method state of another format (a checkpoint written before formats were recorded: the method tells
    its format from the structure of the task-end checkpoint's `extra`)."""
    spec = self.spec
    removed = ckpt_lib.removed_fields(meta['config'])
    if removed and jax.process_index() == 0:
      print(f'note: the checkpoint config sets {", ".join(removed)}, removed since (they did not change results): '
            'ignored', file=sys.stderr, flush=True)
    diffs = ckpt_lib.config_differences(meta['config'], spec.config_dict, cfglib.flat_defaults())
    if diffs:
      raise CheckpointError(
          f'{spec.workdir} holds a run with a different config; refusing to resume over it. Differences:\n  '
          + '\n  '.join(diffs[:20]) + '\nUse a new --workdir for a different run.')
    saved, current = meta.get('method_state_format'), int(spec.method.state_format)
    if saved is None:
      saved = (current if task_start_step is None else   # nothing of the method's is checkpointed before task 0 ends
               spec.method.unversioned_state_format(self.checkpointer.saved_extra_structure(task_start_step)))
    saved = int(saved)
    if saved != current:
      raise CheckpointError(
          f'checkpoint {step} in {self.checkpointer.directory} holds {spec.config.method.name} method state of '
          f'format {saved}; this version reads format {current}. Resume it with the incremental_jax version that '
          'wrote it, or use a new --workdir.')

  def _meta(self, state: RunState) -> dict:
    return {'task': state.cursor.task - 1, 'steps': list(state.records),
            'class_order': self.spec.scenario.order.tolist(), 'config': self.spec.config_dict,
            'method_state_format': int(self.spec.method.state_format)}

  def save(self, state: RunState) -> RunState:
    """Starts writing `state` as a checkpoint at its global train step: a task-end checkpoint when
    `cursor.in_task` is None (returned with `cursor.task_start_step` set to that step), else a mid-task one. The
    arrays are on the host when this returns; the files are written in the background (the next save, `wait` or
    `close` waits for them)."""
    cursor, scenario = state.cursor, self.spec.scenario
    in_task = cursor.in_task
    if in_task is None:
      step = int(jax.device_get(state.train.step))
      self.checkpointer.save(step, state.train, state.frozen, state.method_state,
                             state.memory.to_array(scenario.num_classes), self._meta(state))
      return state.replace(cursor=dataclasses.replace(cursor, task_start_step=step))
    mid = {'task': cursor.task, 'stage': in_task.stage, 'phase': in_task.phase, 'phase_name': in_task.phase_name,
           'epoch': in_task.epoch, 'start_step': cursor.task_start_step,
           'epoch_losses': {k: list(v) for k, v in in_task.losses}, 'phase_losses': list(in_task.phase_losses)}
    memory = None if in_task.memory is None else in_task.memory.to_array(scenario.num_classes)
    self.checkpointer.save_mid_task(int(jax.device_get(in_task.train.step)), in_task.train,
                                    {**self._meta(state), ckpt_lib.MID_TASK: mid}, memory)
    return state

  def log_restored(self, state: RunState) -> None:
    """Logs the evaluations of the tasks `state` restored again (the same values at the same steps), so that a
    process killed after a checkpoint but before its events reached the disk leaves no hole in the curves."""
    if self.tb is not None:
      self.tb.log_tasks(state.records)

  def latest_step(self) -> Optional[int]:
    return self.checkpointer.latest_step()

  def latest_complete_step(self) -> Optional[int]:
    """The latest checkpoint complete in storage, asked without waiting for a save in flight."""
    steps = self.checkpointer.complete_steps()
    return steps[-1] if steps else None

  # ---- result files -------------------------------------------------------------------------------------
  def results(self, records, **extra) -> dict:
    spec = self.spec
    records = list(records)
    return {'method': spec.config.method.name, 'dataset': spec.data.dataset.name,
            'num_tasks': spec.scenario.num_tasks, 'class_order': spec.scenario.order.tolist(),
            'task_sizes': list(spec.scenario.sizes), 'config': spec.config_dict, **metrics_lib.summarize(records),
            'steps': records, 'environment': environment_lib.describe(),
            'complete': len(records) == spec.scenario.num_tasks, **extra}

  def write_results(self, results: dict, plots: bool = False) -> None:
    """results.json and results.csv (and the plots with `plots` and `config.plots`: once, at the run's end;
    `report` draws them on demand); process 0 only."""
    if jax.process_index() == 0:
      metrics_lib.write_results(self.spec.workdir, results, plots=plots and bool(self.spec.config.plots))

  def publish(self, pending: Optional[Pending], just_saved: bool = False) -> Optional[Pending]:
    """Writes the results of `pending` if its checkpoint is complete in storage; returns what is still pending
    (None once written, or when its write failed). Without `just_saved` it asks without waiting and leaves them
    pending while a save is in progress; with it (right after this store started a save, which Orbax starts only
    once the one before is complete), the pending checkpoint is done, written or failed."""
    if pending is None or (not just_saved and self.checkpointer.saving()):
      return pending
    if pending.step in self.checkpointer.complete_steps():
      self.write_results(self.results(pending.records))
    return None

  def publish_saved(self) -> None:
    """After an error: waits for the checkpoint being written (a failed write is not reported again: the error
    already raised is) and writes the results of the latest complete task-end checkpoint, if any."""
    try:
      self.checkpointer.wait()
    except CheckpointError:
      pass
    try:
      ends = [s for s in self.checkpointer.complete_steps() if not self.checkpointer.is_mid_task(s)]
      if ends:
        self.write_results(self.results(self.checkpointer.restore_meta(ends[-1])['steps']))
    except Exception:  # noqa: BLE001 - an unreadable checkpoint: the error already raised is the one reported
      pass
    finally:
      try:
        self.close()
      except CheckpointError:
        pass

  def existing_results(self) -> Optional[dict]:
    """results.json as written, if any."""
    path = paths.as_path(paths.join(self.spec.workdir, 'results.json'))
    return json.loads(path.read_text()) if path.exists() else None

  def close(self) -> None:
    """Waits for the checkpoint being written and closes the checkpointer and the TensorBoard writer."""
    try:
      self.checkpointer.close()
    finally:
      if self.tb is not None:
        self.tb.close()


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
