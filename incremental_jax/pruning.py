"""Magnitude pruning with compact storage: the pruned model snapshots of M2KD (Zhou et al., "M2KD: Incremental
Learning via Multi-model and Multi-level Knowledge Distillation", BMVC 2020), which keeps every earlier model as a
teacher but stores each one through a pruning mask.

A weight array w of n elements keeps its k = `num_kept(n, keep)` largest magnitudes (ties broken by position, so
the count is exact and the same for every snapshot of one architecture). It is stored as

    {'values': the k kept weights in flat (row-major) order, 'bits': the 0/1 mask packed 8 per byte (np.packbits)}

i.e. 4k + ceil(n / 8) bytes instead of 4n for float32. `decompress` rebuilds exactly the masked array (kept
weights bit for bit, zeros elsewhere); it is pure jnp, so it runs under `jax.jit`/`jax.vmap` on stacked
snapshots. Trees (`compress_tree`) prune the leaves that `prunable` selects (by default weight matrices and
convolution kernels, ndim >= 2) and keep the others (biases, BatchNorm parameters) dense.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from incremental_jax import parallel

STORED_KEYS = ('bits', 'values')


def num_kept(size: int, keep: float) -> int:
  """Weights kept out of `size` at keep ratio `keep` in (0, 1]: ceil(keep * size), at least 1."""
  if not 0.0 < keep <= 1.0:
    raise ValueError(f'keep ratio must be in (0, 1]; got {keep}.')
  return max(1, min(size, math.ceil(keep * size - 1e-9)))


def magnitude_mask(w: np.ndarray, keep: float) -> np.ndarray:
  """Boolean mask of w's shape that keeps exactly `num_kept(w.size, keep)` entries of largest |w| (among equal
  magnitudes the earlier flat position wins)."""
  flat = np.abs(np.asarray(w, np.float64)).ravel()
  k = num_kept(flat.size, keep)
  order = np.argsort(-flat, kind='stable')
  mask = np.zeros(flat.size, bool)
  mask[order[:k]] = True
  return parallel.check_agreement(mask.reshape(np.shape(w)), 'prune_masks', f'of a {list(np.shape(w))} weight')


def compress(w: np.ndarray, keep: float) -> dict:
  """{'values': [k] kept weights in flat order, 'bits': uint8 [ceil(n / 8)] packed mask} of `magnitude_mask`."""
  w = np.asarray(w)
  mask = magnitude_mask(w, keep).ravel()
  return {'values': w.ravel()[mask], 'bits': np.packbits(mask)}


def decompress(stored: dict, shape: tuple, dtype=None) -> jax.Array:
  """The masked dense array of `shape` from `compress`'s output (traceable; vmappable over stacked snapshots):
  position i gets values[(number of kept positions before i)] when its bit is set, else 0."""
  size = math.prod(shape)
  bits = jnp.unpackbits(jnp.asarray(stored['bits']), count=size).astype(bool)
  values = jnp.asarray(stored['values'])
  rank = jnp.clip(jnp.cumsum(bits) - 1, 0, values.shape[0] - 1)
  dense = jnp.where(bits, values[rank], jnp.zeros((), values.dtype))
  return dense.reshape(shape).astype(dtype or values.dtype)


def is_stored(node: Any) -> bool:
  return isinstance(node, dict) and tuple(sorted(node)) == STORED_KEYS


def default_prunable(path: tuple, leaf: np.ndarray) -> bool:
  """Weight matrices and convolution kernels (ndim >= 2); vectors (biases, BatchNorm) stay dense."""
  del path
  return np.ndim(leaf) >= 2


def compress_tree(tree: Any, keep: float, prunable: Callable[[tuple, Any], bool] = default_prunable) -> Any:
  """`tree` (str-keyed nested dicts of arrays) with each prunable leaf replaced by its `compress` dict and the
  other leaves kept as dense NumPy copies."""
  def one(path, leaf):
    leaf = np.asarray(leaf)
    return compress(leaf, keep) if prunable(path, leaf) else leaf.copy()
  return jax.tree_util.tree_map_with_path(one, tree)


def decompress_tree(stored: Any, template: Any) -> Any:
  """The dense tree of `template`'s structure (arrays or `jax.ShapeDtypeStruct`s) from `compress_tree`'s output:
  pruned leaves rebuilt by `decompress`, dense ones passed through."""
  def one(t, s):
    return decompress(s, tuple(t.shape), t.dtype) if is_stored(s) else s
  return jax.tree.map(one, template, stored)


def stack(trees: list) -> Any:
  """Trees of one structure and shapes stacked along a new leading axis (NumPy), e.g. snapshots for `jax.vmap`."""
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def nbytes(tree: Any) -> int:
  """Bytes held by the arrays of `tree` (stored or dense)."""
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))
