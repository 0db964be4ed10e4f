"""Orbax checkpoints of a run: one after every task (and optionally during long tasks), from which `main.py`
resumes. Orbax writes into a temporary directory and renames it when complete, so a checkpoint interrupted
by a crash is never the latest one read.

Each checkpoint holds three items:
  train: the TrainState (step counters, params, batch statistics, optimiser state), restored against the
    structure of a freshly initialised state;
  extra: {'frozen': teacher pytree, 'method_state': ..., 'memory': int [C, M] exemplar indices}, restored
    against the shapes recorded in the checkpoint (so its structure may change from task to task);
  meta: JSON (position in the run, per-step results so far, class order, the run's config).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from incremental_jax import parallel

FORMAT_VERSION = 1

# Config fields that may differ between a run and its resumption (they do not change what is computed).
RUNTIME_FIELDS = ('data.data_dir', 'data.num_workers', 'eval.batch_size', 'checkpoint', 'progress', 'workdir')


class CheckpointError(RuntimeError):
  """A checkpoint directory that cannot be resumed (corrupt, foreign, or from a different config)."""


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


def config_differences(saved: dict, current: dict) -> list[str]:
  """Fields (dotted) whose values differ between two config dicts, ignoring RUNTIME_FIELDS."""
  a, b = flatten_config(saved), flatten_config(json.loads(json.dumps(current)))
  skip = lambda k: any(k == f or k.startswith(f + '.') for f in RUNTIME_FIELDS)
  return [f'{k}: checkpoint has {a.get(k, "<absent>")!r}, config has {b.get(k, "<absent>")!r}'
          for k in sorted(set(a) | set(b)) if not skip(k) and a.get(k) != b.get(k)]


class RunCheckpointer:
  """Saves and restores a run's state in `directory` (created if missing)."""

  def __init__(self, directory: str, max_to_keep: Optional[int] = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._check_directory()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep or None, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def _check_directory(self) -> None:
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise CheckpointError(f'{self.directory} exists and is not a directory.')
    if os.path.isdir(self.directory):
      foreign = [n for n in os.listdir(self.directory) if not (n.isdigit() or '.orbax-checkpoint-tmp' in n or n.startswith('.'))]
      if foreign:
        raise CheckpointError(f'{self.directory} holds files that are not checkpoints of this project '
                              f'({sorted(foreign)[:5]}); choose another --workdir or remove them.')

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, train_state, frozen: Any, method_state: dict, memory_array: np.ndarray, meta: dict) -> None:
    """Saves everything at global step `step` (forced, whatever the save interval)."""
    extra = {'frozen': {} if frozen is None else {'tree': frozen}, 'method_state': method_state,
             'memory': np.asarray(memory_array)}
    _check_str_keys(extra, 'checkpoint')
    meta = dict(meta, format_version=FORMAT_VERSION)
    self.manager.save(int(step), force=True, args=ocp.args.Composite(
        train=ocp.args.StandardSave(train_state), extra=ocp.args.StandardSave(extra),
        meta=ocp.args.JsonSave(meta)))

  def restore_meta(self, step: int) -> dict:
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # noqa: BLE001 - any failure here means an unreadable checkpoint
      raise CheckpointError(f'cannot read the metadata of checkpoint {step} in {self.directory}: {e}. '
                            'The directory is corrupt or not written by incremental_jax; '
                            'use a new --workdir or delete that checkpoint.') from e
    if not isinstance(meta, dict) or meta.get('format_version') != FORMAT_VERSION:
      raise CheckpointError(f'checkpoint {step} in {self.directory} is not an incremental_jax checkpoint '
                            f'(format {meta.get("format_version") if isinstance(meta, dict) else None!r}).')
    return meta

  def restore(self, step: int, train_template, mesh) -> tuple[Any, Any, dict, np.ndarray]:
    """(train_state, frozen, method_state, memory_array) of checkpoint `step`, replicated over `mesh`."""
    repl = parallel.replicated(mesh)
    abstract_train = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), train_template)
    try:
      extra_meta = self.manager.item_metadata(step)['extra']
      abstract_extra = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=repl), extra_meta)
      restored = self.manager.restore(step, args=ocp.args.Composite(
          train=ocp.args.StandardRestore(abstract_train), extra=ocp.args.StandardRestore(abstract_extra)))
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f'cannot restore checkpoint {step} from {self.directory}: {e}. It is corrupt or was '
                            'written by a different model/config; use a new --workdir.') from e
    extra = restored['extra']
    frozen = extra['frozen'].get('tree') if extra['frozen'] else None
    return restored['train'], frozen, dict(extra['method_state']), np.asarray(extra['memory']).astype(np.int64)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
