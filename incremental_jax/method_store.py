"""The networks and files a method keeps in its run's workdir (local or `gs://`), handed to its hooks as
`TaskContext.store` (as `trainer` is): methods never build paths, create checkpointers or open files.

A network is kept as a one-task run checkpoint of this project (`checkpoint.RunCheckpointer`) in
`<workdir>/<name>/checkpoints/<step>`, the layout of a `configs/train.py` run's workdir, so `<workdir>/<name>`
is itself a workdir that `method.teacher_workdir` accepts, and a `configs/train.py` workdir is read by the
module-level `load_network`. A file is `<workdir>/<name>`, written whole by process 0 (`paths.atomic_write`).
"""
from __future__ import annotations

import json
from typing import Any, Optional

import jax

from incremental_jax import checkpoint as ckpt_lib
from incremental_jax import paths
from incremental_jax.errors import CheckpointError
from incremental_jax.memory import Memory

CHECKPOINTS = 'checkpoints'   # <workdir>/checkpoints: a run's checkpoints (run.py writes the same folder)


def _checkpoints(workdir: str) -> str:
  return paths.join(workdir, CHECKPOINTS)


def _latest_step(workdir: str) -> Optional[int]:
  """The latest complete checkpoint step of `workdir` (None when there is none); creates nothing."""
  directory = _checkpoints(workdir)
  if not paths.is_dir(directory):
    return None
  checkpointer = ckpt_lib.RunCheckpointer(directory, max_to_keep=None, async_save=False)
  try:
    return checkpointer.latest_step()
  finally:
    checkpointer.close()


def has_network(workdir: str) -> bool:
  """Whether `workdir` (local or in a bucket) holds a complete checkpoint of this project: a step Orbax finished
  writing (in a bucket, a step without its commit marker, left by a killed save, does not count)."""
  return _latest_step(workdir) is not None


def require_network(workdir: str) -> int:
  """The latest complete checkpoint step of `workdir`; raises CheckpointError saying what is expected when there
  is none."""
  step = _latest_step(workdir)
  if step is None:
    raise CheckpointError(
        f'{workdir} holds no checkpoint (expected {_checkpoints(workdir)}/<step>). Train a teacher with '
        '`python main.py --config=configs/train.py:<preset> --workdir=<dir>` and pass that <dir>.')
  return step


def load_network(workdir: str, model, mesh) -> tuple[dict, dict]:
  """(`{'params', 'batch_stats'}`, meta) of the latest checkpoint of a workdir written by this project (a
  `configs/train.py` run, or a network a `MethodStore` saved), replicated over `mesh`. The train state is
  restored as it was saved (whatever optimiser trained it) and its parameters and batch statistics must have
  `model`'s structure and shapes."""
  step = require_network(workdir)
  checkpointer = ckpt_lib.RunCheckpointer(_checkpoints(workdir), max_to_keep=None, async_save=False)
  try:
    meta = checkpointer.restore_meta(step)
    saved = checkpointer.saved_train_structure(step)
    state = checkpointer.restore(step, saved, mesh)[0]
  finally:
    checkpointer.close()
  network = {'params': state['params'], 'batch_stats': state['batch_stats']}
  _check_structure(network, model, f'checkpoint {step} in {_checkpoints(workdir)}')
  return network, meta


def _check_structure(network: dict, model, where: str) -> None:
  """Raises CheckpointError when `network`'s tree or array shapes are not those of `model`'s variables."""
  params, stats = jax.eval_shape(model.init_variables)
  shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)
  expected = {'params': shapes(params), 'batch_stats': shapes(stats)}
  if shapes(network) != expected:
    raise CheckpointError(f'{where} does not hold a network of the expected architecture (its parameters or '
                          'their shapes differ); check the model section it was trained with.')


def save_network(workdir: str, state, config, class_order, num_classes: int) -> None:
  """Checkpoints a trained network (its `TrainState`) into `<workdir>/checkpoints` as a one-task run of `config`
  would, with the run's class order (the labels' meaning), and waits until the write is complete."""
  checkpointer = ckpt_lib.RunCheckpointer(_checkpoints(workdir), max_to_keep=1, async_save=False)
  meta = {'task': 0, 'steps': [], 'class_order': list(map(int, class_order)),
          'config': json.loads(config.to_json_best_effort())}
  try:
    checkpointer.save(int(jax.device_get(state.step)), state, None, {}, Memory().to_array(num_classes), meta)
  finally:
    checkpointer.close()


class MethodStore:
  """What a method keeps in the workdir of its run (`workdir`, local or `gs://`): networks by name (`teacher`
  -> `<workdir>/teacher/checkpoints/<step>`) and JSON files by name (`m2kd_snapshots.json`)."""

  def __init__(self, workdir: str):
    self.workdir = workdir

  def location(self, name: str) -> str:
    """Where the network or file `name` is kept (for messages, and for `method.teacher_workdir`)."""
    return paths.join(self.workdir, name)

  def has_network(self, name: str) -> bool:
    return has_network(self.location(name))

  def load_network(self, name: str, model, mesh) -> tuple[dict, dict]:
    """(frozen `{'params', 'batch_stats'}`, meta) of the network `name` (see `load_network`)."""
    return load_network(self.location(name), model, mesh)

  def save_network(self, name: str, state, config, class_order, num_classes: int) -> None:
    save_network(self.location(name), state, config, class_order, num_classes)

  def write_json(self, name: str, obj: Any) -> None:
    """Replaces the file `name` by `obj` as JSON (process 0; a reader never sees a partial file)."""
    if jax.process_index() == 0:
      paths.atomic_write(self.location(name), json.dumps(obj, indent=1))
