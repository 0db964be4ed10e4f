"""Data parallelism over every device with a 1-D `jax.sharding.Mesh` ('data' axis): the batch is sharded,
everything else replicated. The same code runs on one CPU, several GPUs and multi-host TPU pods; with
`Auto` axis types the compiler makes batch-global quantities (BatchNorm statistics, BAKE's affinity)
global across devices."""
from __future__ import annotations

import functools
import hashlib
import sys
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from incremental_jax import faults


def make_mesh(devices: Any = None) -> jax.sharding.Mesh:
  """A 1-D mesh named 'data' over `devices` (default: all devices of all processes)."""
  if devices is None:
    return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  return jax.sharding.Mesh(np.asarray(devices), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places a pytree of host or device arrays on every device of the mesh."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def host_input(x: np.ndarray, mesh: jax.sharding.Mesh):
  """A small host array (index rows, masks) for a jitted call: as it is with one process (the call transfers it,
  the cheapest way), else the global replicated array that every process passes."""
  return x if jax.process_count() == 1 else replicate(x, mesh)


def process_slice(global_size: int) -> slice:
  """The part of a global batch this process loads: contiguous, `global_size // process_count` examples."""
  n = jax.process_count()
  if global_size % n:
    raise ValueError(f'global batch {global_size} is not divisible by the {n} processes.')
  per = global_size // n
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


@functools.lru_cache(maxsize=64)
def process_rows(global_size: int, mesh: jax.sharding.Mesh) -> np.ndarray:
  """Positions (in a global batch of `global_size`) of the examples this process loads: the rows its devices
  hold under `batch_sharded(mesh)`, in the order `jax.make_array_from_process_local_data` expects them (rows
  of the lowest-indexed shard first). Every row when there is a single process."""
  if jax.process_count() == 1:
    return np.arange(global_size)
  if global_size % mesh.size:
    raise ValueError(f'global batch {global_size} is not divisible by the {mesh.size} devices of the mesh.')
  index_map = batch_sharded(mesh).addressable_devices_indices_map((global_size,))
  bounds = sorted({(idx[0].start or 0, global_size if idx[0].stop is None else idx[0].stop)
                   for idx in index_map.values()})
  return np.concatenate([np.arange(a, b) for a, b in bounds])


def shard_batch(local_batch: dict, mesh: jax.sharding.Mesh, global_size: int, batch_axis: int = 0) -> dict:
  """This process's part of a batch (numpy) -> global arrays sharded over the 'data' axis along `batch_axis`
  (1 for batches with a leading run axis, see `train.phase_epochs`)."""
  sharding = NamedSharding(mesh, P(*([None] * batch_axis), 'data'))

  def global_array(v):
    shape = v.shape[:batch_axis] + (global_size,) + v.shape[batch_axis + 1:]
    return jax.make_array_from_process_local_data(sharding, v, shape)

  return {k: global_array(v) for k, v in local_batch.items()}


def check_batch_divisible(batch_size: int, what: str = 'batch_size') -> None:
  d = jax.device_count()
  if batch_size % d:
    raise ValueError(f'{what}={batch_size} is not divisible by the {d} devices; choose a multiple of {d}.')


# ---- host decisions every process must share ---------------------------------------------------------------


class HostDisagreement(RuntimeError):
  """Processes computed a decision that must be identical on every process differently."""


def _digest(tree: Any) -> np.ndarray:
  """uint8 [32]: SHA-256 of the leaves' shapes, dtypes and bytes."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    leaf = np.ascontiguousarray(leaf)
    h.update(f'{leaf.shape}{leaf.dtype}'.encode())
    h.update(leaf.tobytes())
  return np.frombuffer(h.digest(), np.uint8)


def check_agreement(tree: Any, decision: str, where: str) -> Any:
  """`tree` (numpy arrays computed on the host) after checking that every process computed the same one (one
  all-gather of a 32-byte digest); raises HostDisagreement naming the decision and `where` (e.g. 'in task 3')
  otherwise, on every process. One process: returned as it is. `faults.perturbed` may alter it first (tests)."""
  tree = jax.tree.map(lambda x: faults.perturbed(decision, x), tree)
  if jax.process_count() == 1:
    return tree
  digests = np.asarray(multihost_utils.process_allgather(_digest(tree)))
  differ = [p for p in range(len(digests)) if not np.array_equal(digests[p], digests[0])]
  if differ:
    raise HostDisagreement(f'process(es) {differ} computed {faults.DECISIONS[decision]} {where} differently from process '
                           '0 (a different library version, BLAS or float tie on that host?); stopping rather than '
                           'train different models.')
  return tree


def broadcast_decision(value: np.ndarray, decision: str, where: str) -> np.ndarray:
  """Process 0's `value` (a numpy array computed on every host) on every process, so that the hosts cannot
  disagree; a process whose own value differed says so in one line on stderr. One process: `value`."""
  value = np.asarray(faults.perturbed(decision, value))
  if jax.process_count() == 1:
    return value
  # Without jax_enable_x64, 64-bit arrays would travel as 32-bit ones: indices are sent as int32 (checked).
  sent = {np.dtype(bool): np.uint8, np.dtype(np.int64): np.int32}.get(value.dtype, value.dtype)
  if value.dtype == np.int64 and value.size and np.abs(value).max() >= 2 ** 31:
    raise ValueError(f'{faults.DECISIONS[decision]} holds indices beyond int32.')
  sent = value.astype(sent)
  agreed = np.asarray(multihost_utils.broadcast_one_to_all(sent)).astype(value.dtype)
  if not np.array_equal(agreed, value):
    print(f'warning: process {jax.process_index()} computed {faults.DECISIONS[decision]} {where} differently from process 0; '
          "using process 0's.", file=sys.stderr, flush=True)
  return agreed
