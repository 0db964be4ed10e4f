"""Orbax checkpoints of a run: one after every task (and optionally during long tasks), from which `main.py`
resumes. Orbax writes into a temporary directory and renames it when complete, so a checkpoint interrupted
by a crash is never the latest one read (leftover temporary directories are removed at the next start). In a
bucket (`gs://`), which has no atomic rename, Orbax writes the step's directory in place and writes its
`commit_success.txt` last; a step without it is never read.

A task-end checkpoint holds three items:
  train: the TrainState (step counters, params, batch statistics, optimiser state), restored against the
    structure of a freshly initialised state;
  extra: {'frozen': teacher pytree, 'method_state': ..., 'memory': int [C, M] exemplar indices}, restored
    against the shapes recorded in the checkpoint (so its structure may change from task to task);
  meta: JSON (position in the run, per-step results so far, class order, the run's config).
A mid-task checkpoint (`checkpoint.every_epochs`, or a stop request) holds `train` (the state inside a phase),
`meta` and, once the task updated its memory, `extra` {'memory'}; its meta's
`mid_task` entry says where in the task it was taken and which task-end checkpoint the task started from;
that task-end checkpoint is kept as long as a later mid-task checkpoint needs it.

Every checkpoint step is the run's global train step. Retention: the latest `max_to_keep` task-end
checkpoints, plus the latest checkpoint whatever its kind; older mid-task checkpoints are removed once a newer
checkpoint is complete.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from incremental_jax import faults, parallel, paths
from incremental_jax.errors import CheckpointError

FORMAT_VERSION = 1

# Config fields that may differ between a run and its resumption (they do not change what is computed).
RUNTIME_FIELDS = ('data.data_dir', 'data.num_workers', 'data.workers', 'data.prefetch', 'eval.batch_size', 'checkpoint',
                  'progress', 'workdir', 'compilation_cache', 'data.on_device', 'data.chunk_steps', 'sweep',
                  'reference_table')
# Fields added with a default that changes results: a checkpoint written before them ran with this value (a
# resume under today's default is a config difference, not a silent change of protocol).
LEGACY_DEFAULTS = {'data.augment.brightness_mode': 'add', 'optim.schedule_offset': 0,
                   'method.finetune_bn_train': False,
                   'data.drop_last': True,   # before it, every epoch dropped its last partial batch
                   'model.bn_running_var': 'biased'}   # before it, flax's BatchNorm update
# Fields that change nothing while another field is 0 (no jitter, no jitter mode).
USED_ONLY_WITH = {'data.augment.brightness_mode': 'data.augment.brightness'}
# Config fields removed from the library that did not change results (kernel choices): a checkpoint whose config
# still sets them resumes, with one line saying they are ignored.
REMOVED_FIELDS = ('model.bn_impl', 'model.conv_impl')


def removed_fields(saved: dict) -> list[str]:
  """The REMOVED_FIELDS a checkpoint's config dict sets."""
  flat = flatten_config(saved)
  return [f for f in REMOVED_FIELDS if f in flat]




def _check_str_keys(tree: Any, where: str) -> None:
  def visit(node, path):
    if isinstance(node, dict):
      for k, v in node.items():
        if not isinstance(k, str):
          raise TypeError(f'{where}: checkpointed dicts need string keys; found {k!r} at {path or "root"}.')
        visit(v, f'{path}/{k}')
    elif isinstance(node, (list, tuple)) and not hasattr(node, '_fields'):
      raise TypeError(f'{where}: use str-keyed dicts instead of lists/tuples (at {path or "root"}).')
  visit(tree, '')


def flatten_config(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(flatten_config(v, key + '.'))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def config_differences(saved: dict, current: dict, defaults: Optional[dict] = None) -> list[str]:
  """Fields (dotted) whose values differ between two config dicts, ignoring RUNTIME_FIELDS and REMOVED_FIELDS. A
  field absent from `saved` (written before the field was declared) has its LEGACY_DEFAULTS value, or else is no
  difference when its current value is its default in `defaults` ({'section.field': value}); a USED_ONLY_WITH
  field is no difference while its other field is 0 in both."""
  a, b = flatten_config(saved), flatten_config(json.loads(json.dumps(current)))
  a = {**{k: v for k, v in LEGACY_DEFAULTS.items() if k in b}, **a}
  defaults = json.loads(json.dumps(defaults or {}))
  skip = lambda k: (any(k == f or k.startswith(f + '.') for f in RUNTIME_FIELDS + REMOVED_FIELDS)
                    or (k not in a and k in defaults and b.get(k) == defaults[k])
                    or (k in USED_ONLY_WITH and not a.get(USED_ONLY_WITH[k]) and not b.get(USED_ONLY_WITH[k])))
  return [f'{k}: checkpoint has {a.get(k, "<absent>")!r}, config has {b.get(k, "<absent>")!r}'
          for k in sorted(set(a) | set(b)) if not skip(k) and a.get(k) != b.get(k)]


TASK_END, MID_TASK = 'task_end', 'mid_task'


@dataclasses.dataclass(frozen=True)
class _KeepTaskEnds:
  """Orbax preservation policy: the latest `max_to_keep` task-end checkpoints (all when None) and the latest
  checkpoint; `is_mid_task(step)` tells the kinds apart."""
  max_to_keep: Optional[int]
  is_mid_task: Any

  def should_preserve(self, checkpoints, *, context=None) -> list[bool]:
    del context
    ends = [i for i, c in enumerate(checkpoints) if not self.is_mid_task(c.step)]
    keep = set(ends[-self.max_to_keep:] if self.max_to_keep else ends)
    keep.update([len(checkpoints) - 1] if checkpoints else [])
    return [i in keep for i in range(len(checkpoints))]


class RunCheckpointer:
  """Saves and restores a run's state in `directory` (created if missing): a local folder or a bucket path
  (`gs://bucket/run/checkpoints`; Orbax writes the arrays through TensorStore's own GCS driver and the rest
  through `etils.epath`)."""

  def __init__(self, directory: str, max_to_keep: Optional[int] = 2, async_save: bool = True):
    self._path = paths.as_path(directory)   # a local folder (made absolute) or a bucket path (gs://...)
    self.directory = str(self._path)
    self._check_directory()
    self._kinds: dict[int, str] = {}
    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        preservation_policy=_KeepTaskEnds(max_to_keep or None, self.is_mid_task))
    handlers = {'train': ocp.StandardCheckpointHandler(), 'extra': ocp.StandardCheckpointHandler(),
                'meta': ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self._path, options=options, item_handlers=handlers)
    for step in self.manager.all_steps():
      try:
        self._kinds[step] = MID_TASK if MID_TASK in self.restore_meta(step) else TASK_END
      except CheckpointError:
        pass  # reported if and when this step is the one resumed from

  def _check_directory(self) -> None:
    if not self._path.is_dir():
      if self._path.exists():
        raise CheckpointError(f'{self.directory} exists and is not a directory.')
      return
    names = [p.name for p in self._path.iterdir()]
    foreign = [n for n in names if not (n.isdigit() or '.orbax-checkpoint-tmp' in n or n.startswith('.'))]
    if foreign:
      raise CheckpointError(f'{self.directory} holds files that are not checkpoints of this project '
                            f'({sorted(foreign)[:5]}); choose another --workdir or remove them.')

  def is_mid_task(self, step: int) -> bool:
    """Whether checkpoint `step` is a mid-task one (an unreadable step counts as a task end)."""
    return self._kinds.get(int(step), TASK_END) == MID_TASK

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def complete_steps(self) -> list[int]:
    """The steps whose checkpoint is complete in storage (renamed from its temporary directory, or committed in a
    bucket), read from the directory: Orbax's own list also holds a step whose background write failed."""
    return sorted(ocp.path.step.checkpoint_steps(self._path))

  def save(self, step: int, train_state, frozen: Any, method_state: dict, memory_array: np.ndarray, meta: dict) -> None:
    """Saves everything at global step `step` (forced, whatever the save interval): a task-end checkpoint.
    The write continues in the background; `wait()` returns when it is complete."""
    extra = {'frozen': {} if frozen is None else {'tree': frozen}, 'method_state': method_state,
             'memory': np.asarray(memory_array)}
    _check_str_keys(extra, 'checkpoint')
    self._save(step, TASK_END, meta, train=ocp.args.StandardSave(train_state), extra=ocp.args.StandardSave(extra))

  def save_mid_task(self, step: int, train_state, meta: dict, memory_array: Optional[np.ndarray] = None) -> None:
    """Saves the train state inside a task at global step `step` (and the memory once the task updated it);
    `meta['mid_task']` says where."""
    if MID_TASK not in meta:
      raise ValueError(f'a mid-task checkpoint needs meta[{MID_TASK!r}].')
    extra = {} if memory_array is None else {'extra': ocp.args.StandardSave({'memory': np.asarray(memory_array)})}
    self._save(step, MID_TASK, meta, train=ocp.args.StandardSave(train_state), **extra)

  def _save(self, step: int, kind: str, meta: dict, **items) -> None:
    with self._failed_writes_reported():   # Orbax's save first waits for the previous one, which may have failed
      if int(step) in self.manager.all_steps() and self.is_mid_task(step):
        # A mid-task checkpoint at this step (a task stopped in its `after_task` hook, after its last train step)
        # is superseded by this one.
        self.manager.wait_until_finished()
        self.manager.delete(int(step))
      self._kinds[int(step)] = kind
      self.manager.save(int(step), force=True, args=ocp.args.Composite(
          meta=ocp.args.JsonSave(dict(meta, format_version=FORMAT_VERSION)), **items))
    faults.reached('checkpoint_write')

  @contextlib.contextmanager
  def _failed_writes_reported(self):
    """Turns a failed (background) checkpoint write, which Orbax raises at the next save or wait, into one
    CheckpointError naming the directory, the cause and the complete checkpoints a rerun resumes from."""
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 - storage failures come as OSError, TensorStore's ValueError, ...
      detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else ''
      complete = self.complete_steps()
      raise CheckpointError(
          f'a checkpoint could not be written in {self.directory} ({type(e).__name__}: {detail}); the complete '
          f'checkpoints are kept ({complete if complete else "none"}): fix the storage and run the same command '
          'again to resume from the latest of them.') from e

  def _unreadable(self, step: int, what: str, error: Exception) -> CheckpointError:
    detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    others = [s for s in self.all_steps() if s != step]
    advice = (f'To resume from the previous checkpoint, delete {paths.join(self.directory, str(step))} '
              f'(others there: {others}); to start over, use a new --workdir.' if others else
              'Use a new --workdir (or delete the checkpoints directory, losing this run).')
    return CheckpointError(f'cannot {what} checkpoint {step} in {self.directory}: it is corrupt, incomplete or was '
                           f'not written by incremental_jax for this model ({type(error).__name__}: {detail}). '
                           + advice)

  def restore_meta(self, step: int) -> dict:
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # noqa: BLE001 - any failure here means an unreadable checkpoint
      raise self._unreadable(step, 'read the metadata of', e) from e
    if not isinstance(meta, dict) or meta.get('format_version') != FORMAT_VERSION:
      raise CheckpointError(f'checkpoint {step} in {self.directory} is not an incremental_jax checkpoint '
                            f'(format {meta.get("format_version") if isinstance(meta, dict) else None!r}); '
                            'use a new --workdir.')
    return meta

  def _abstract(self, template, mesh):
    repl = parallel.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), template)

  def saved_train_structure(self, step: int):
    """The structure (shapes and dtypes) of checkpoint `step`'s train state as it was saved, to restore it
    whatever optimiser wrote it."""
    try:
      return self.manager.item_metadata(step)['train']
    except Exception as e:  # noqa: BLE001
      raise self._unreadable(step, 'read the metadata of', e) from e

  def saved_extra_structure(self, step: int):
    """The structure of task-end checkpoint `step`'s `extra` item ({'frozen', 'method_state', 'memory'})."""
    try:
      return self.manager.item_metadata(step)['extra']
    except Exception as e:  # noqa: BLE001
      raise self._unreadable(step, 'read the metadata of', e) from e

  def restore_mid_task(self, step: int, train_template, mesh) -> tuple[Any, Optional[np.ndarray]]:
    """(train_state, memory_array or None) of mid-task checkpoint `step`, replicated over `mesh`."""
    try:
      items = {'train': ocp.args.StandardRestore(self._abstract(train_template, mesh))}
      extra_meta = self.manager.item_metadata(step).get('extra')
      if extra_meta is not None:
        items['extra'] = ocp.args.StandardRestore(self._abstract(extra_meta, mesh))
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001
      raise self._unreadable(step, 'restore', e) from e
    memory = restored['extra']['memory'] if extra_meta is not None else None
    return restored['train'], None if memory is None else np.asarray(memory).astype(np.int64)

  def restore(self, step: int, train_template, mesh) -> tuple[Any, Any, dict, np.ndarray]:
    """(train_state, frozen, method_state, memory_array) of task-end checkpoint `step`, replicated over `mesh`."""
    try:
      extra_meta = self.manager.item_metadata(step)['extra']
      abstract_extra = self._abstract(extra_meta, mesh)
      restored = self.manager.restore(step, args=ocp.args.Composite(
          train=ocp.args.StandardRestore(self._abstract(train_template, mesh)),
          extra=ocp.args.StandardRestore(abstract_extra)))
    except Exception as e:  # noqa: BLE001
      raise self._unreadable(step, 'restore', e) from e
    extra = restored['extra']
    frozen = extra['frozen'].get('tree') if extra['frozen'] else None
    return restored['train'], frozen, dict(extra['method_state']), np.asarray(extra['memory']).astype(np.int64)

  def wait(self) -> None:
    with self._failed_writes_reported():
      self.manager.wait_until_finished()

  def saving(self) -> bool:
    """Whether a save started earlier is still being written (asked without waiting)."""
    return self.manager.is_saving_in_progress()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()
