"""Host-side input pipeline: epoch samplers (index arrays), batch gathering, sharding and prefetching.

A sampler maps (example indices, their labels, batch size, numpy Generator) to an int array [steps, batch]
of one epoch; every process computes the same array (same seed) and loads only its slice of each row.
"""
from __future__ import annotations

import collections
import concurrent.futures
from typing import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np

from incremental_jax import parallel


def shuffle_sampler(indices: np.ndarray, labels: np.ndarray, batch_size: int, rng: np.random.Generator,
                    **unused) -> np.ndarray:
  """Reshuffles each epoch and drops the last partial batch (a set smaller than one batch is repeated to fill
  one); steps per epoch = max(1, n // batch_size)."""
  del labels
  n = len(indices)
  if n == 0:
    raise ValueError('cannot sample batches from an empty set of examples.')
  steps = max(1, n // batch_size)
  perm = rng.permutation(n)
  while len(perm) < steps * batch_size:
    perm = np.concatenate([perm, rng.permutation(n)])
  return np.asarray(indices)[perm[:steps * batch_size]].reshape(steps, batch_size)


def same_class_partners(labels: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
  """For each example i, `m` other examples of its class as positions [n, m] into `labels`: distinct (without
  replacement) when the class has more than `m` examples, else drawn with replacement from the others; an
  example alone in its class is its own partner. Each example's partners are a uniformly random choice among
  its class mates: the `m` examples after it in a random cyclic order of its class."""
  labels = np.asarray(labels)
  n = len(labels)
  order = np.lexsort((rng.random(n), labels))             # grouped by class, random order within a class
  _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
  start, count = np.repeat(starts, counts), np.repeat(counts, counts)
  rank = np.arange(n) - start                             # position within its class's random cycle
  offsets = np.broadcast_to(np.arange(1, m + 1), (n, m))  # the next m in the cycle: distinct, never itself
  with_replacement = 1 + np.floor(rng.random((n, m)) * (count[:, None] - 1)).astype(np.int64)
  offsets = np.where((count > m)[:, None], offsets, with_replacement)
  partners = np.empty((n, m), np.int64)
  partners[order] = order[start[:, None] + (rank[:, None] + offsets) % count[:, None]]
  return partners


def intra_class_sampler(indices: np.ndarray, labels: np.ndarray, batch_size: int, rng: np.random.Generator,
                        same_class_per_anchor: int = 1, **unused) -> np.ndarray:
  """BAKE's intra-class sampler (Ge et al. 2021): each batch of `batch_size` images holds
  batch_size / (M + 1) anchors, each followed by M other images of its class (`same_class_partners`),
  M = `same_class_per_anchor`. The anchors are a reshuffled pass over the examples (as `shuffle_sampler`, the
  last partial batch of anchors dropped), so every example is an anchor once per epoch and an epoch has
  (M + 1) times the steps of a shuffled epoch, as in the official code. M = 0 gives plain shuffled batches."""
  group = int(same_class_per_anchor) + 1
  if group < 1 or batch_size % group:
    raise ValueError(f'batch_size={batch_size} must be a multiple of same_class_per_anchor + 1 = {group}.')
  anchors = shuffle_sampler(np.arange(len(indices)), None, batch_size // group, rng)   # [steps, anchors]
  partners = same_class_partners(labels, group - 1, rng)
  rows = np.concatenate([anchors[..., None], partners[anchors]], axis=-1)              # [steps, anchors, M+1]
  return np.asarray(indices)[rows].reshape(len(anchors), batch_size)


SAMPLERS: dict[str, Callable[..., np.ndarray]] = {'shuffle': shuffle_sampler, 'intra_class': intra_class_sampler}


def get_sampler(name: str) -> Callable[..., np.ndarray]:
  if name not in SAMPLERS:
    raise ValueError(f'Unknown sampler {name!r}; valid names: {sorted(SAMPLERS)}.')
  return SAMPLERS[name]


def gather(images, labels: np.ndarray, idx: np.ndarray) -> dict:
  """A host batch {'image': uint8 [n,H,W,C], 'label': int32 [n], 'index': int32 [n]} of examples `idx`."""
  return {'image': np.asarray(images[idx]), 'label': labels[idx].astype(np.int32), 'index': idx.astype(np.int32)}


def device_batches(images, labels: np.ndarray, batches: Iterable[np.ndarray], mesh, prefetch: int = 2) -> Iterator[dict]:
  """Global, sharded device batches for each index row of `batches`; this process loads only its slice.
  Loading runs `prefetch` batches ahead in a background thread (decoding lazy image folders overlaps the
  device's work)."""

  def load(row):
    local = row if jax.process_count() == 1 else row[parallel.process_rows(len(row), mesh)]
    return parallel.shard_batch(gather(images, labels, local), mesh, len(row))

  return _prefetched(load, batches, prefetch)


def device_run_batches(images, labels: Sequence[np.ndarray], batches: Iterable[Sequence[np.ndarray]], mesh,
                       prefetch: int = 2) -> Iterator[dict]:
  """Like `device_batches` for R runs trained together: each item of `batches` holds one index row per run,
  run k's labels are `labels[k]`; the device batch has a leading run axis [R, batch, ...], sharded over the
  'data' axis along the batch."""

  def load(rows):
    local = [r if jax.process_count() == 1 else r[parallel.process_rows(len(r), mesh)] for r in rows]
    per_run = [gather(images, lab, r) for lab, r in zip(labels, local)]
    stacked = {k: np.stack([b[k] for b in per_run]) for k in per_run[0]}
    return parallel.shard_batch(stacked, mesh, len(rows[0]), batch_axis=1)

  return _prefetched(load, batches, prefetch)


def _prefetched(load: Callable, items: Iterable, prefetch: int) -> Iterator:
  """`load(item)` for each item, computed `prefetch` items ahead in a background thread."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(load, item))
      if len(pending) > prefetch:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def padded_rows(n: int, batch_size: int) -> tuple[np.ndarray, int]:
  """Indices 0..n-1 in rows of `batch_size`, the last row padded by repeating index 0; returns (rows, n)."""
  steps = max(1, -(-n // batch_size))
  idx = np.zeros(steps * batch_size, np.int64)
  idx[:n] = np.arange(n)
  return idx.reshape(steps, batch_size), n
