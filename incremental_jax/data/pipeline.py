"""Input pipeline: epoch samplers (index arrays), the images kept on the device (`DeviceImages`), and for
images that stay on the host (large or lazy image folders) batch gathering, sharding and prefetching.

A sampler maps (example indices, their labels, batch size, numpy Generator) to an int array [steps, batch]
of one epoch; every process computes the same array (same seed). With the images on the device, the index
rows themselves go to the compiled loop, which gathers the batches; otherwise each process loads its slice of
each row on the host.
"""
from __future__ import annotations

import collections
import concurrent.futures
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import jax
import numpy as np

from incremental_jax import parallel
from incremental_jax.registry import Registry


PAD = -1   # the index of a padding entry in a sampler's rows (weight 0, see `batch_weight`)


def shuffle_sampler(indices: np.ndarray, labels: np.ndarray, batch_size: int, rng: np.random.Generator,
                    drop_last: bool = False, **unused) -> np.ndarray:
  """One reshuffled pass over `indices` in rows of `batch_size`, as PyTorch's `DataLoader(shuffle=True)`.

  `drop_last` False (PyTorch's default): ceil(n / batch_size) rows, the last partial batch kept and padded with
  -1 (`PAD`; a set smaller than one batch is one row of its n examples plus -1s). `drop_last` True: the last
  partial batch is dropped, max(1, n // batch_size) rows (a set smaller than one batch is repeated to fill one).
  Both draw the same permutation, so their full rows are equal."""
  del labels
  n = len(indices)
  if n == 0:
    raise ValueError('cannot sample batches from an empty set of examples.')
  perm = rng.permutation(n)
  if not drop_last:
    steps = -(-n // batch_size)
    rows = np.full(steps * batch_size, PAD, np.asarray(indices).dtype)
    rows[:n] = np.asarray(indices)[perm]
    return rows.reshape(steps, batch_size)
  steps = max(1, n // batch_size)
  while len(perm) < steps * batch_size:
    perm = np.concatenate([perm, rng.permutation(n)])
  return np.asarray(indices)[perm[:steps * batch_size]].reshape(steps, batch_size)


def batch_weight(rows: np.ndarray) -> np.ndarray:
  """float32 weights of index rows: 1 for an example, 0 for padding (`PAD`)."""
  return (np.asarray(rows) >= 0).astype(np.float32)


def loadable(rows: np.ndarray) -> np.ndarray:
  """Index rows with every padding entry replaced by 0, an index that can be loaded (the data set's first
  example; its weight stays 0: `batch_weight` of the original rows)."""
  return np.maximum(rows, 0)


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
                        same_class_per_anchor: int = 1, drop_last: bool = False, **unused) -> np.ndarray:
  """BAKE's intra-class sampler (Ge et al. 2021): each batch of `batch_size` images holds
  batch_size / (M + 1) anchors, each followed by M other images of its class (`same_class_partners`),
  M = `same_class_per_anchor`. The anchors are a reshuffled pass over the examples (`shuffle_sampler` with
  `drop_last`), so every example is an anchor once per epoch and an epoch has (M + 1) times the steps of a
  shuffled epoch, as in the official code. With `drop_last` False the anchors' last partial batch is kept, with
  their partners; its missing anchor groups are padding (-1). M = 0 gives plain shuffled batches."""
  group = int(same_class_per_anchor) + 1
  if group < 1 or batch_size % group:
    raise ValueError(f'batch_size={batch_size} must be a multiple of same_class_per_anchor + 1 = {group}.')
  anchors = shuffle_sampler(np.arange(len(indices)), None, batch_size // group, rng, drop_last)  # [steps, anchors]
  partners = same_class_partners(labels, group - 1, rng)
  rows = np.concatenate([anchors[..., None], partners[np.maximum(anchors, 0)]], axis=-1)    # [steps, anchors, M+1]
  rows = np.where(anchors[..., None] >= 0, np.asarray(indices)[rows], PAD)
  return rows.reshape(len(anchors), batch_size)


SAMPLERS: Registry[Callable[..., np.ndarray]] = Registry('a sampler', {'shuffle': shuffle_sampler,
                                                                      'intra_class': intra_class_sampler})


def get_sampler(name: str) -> Callable[..., np.ndarray]:
  return SAMPLERS.lookup(name, 'data.sampler')


def gather(images, labels: np.ndarray, idx: np.ndarray) -> dict:
  """A host batch {'image': uint8 [n,H,W,C], 'label': int32 [n]} of examples `idx`."""
  return {'image': np.asarray(images[idx]), 'label': labels[idx].astype(np.int32)}


class DeviceImages:
  """A uint8 image array [N, H, W, C] that also lives on the device, replicated over the mesh, placed once (at
  first use) and read by every compiled pass: training gathers its batches from it by index, inference,
  herding and NME too. For host code it behaves as the NumPy array (`len`, `shape`, indexing, `np.asarray`).
  `rows` restricts it to some examples (`subset`) without a copy."""

  def __init__(self, host: np.ndarray, mesh, rows: Optional[np.ndarray] = None, _device: Any = None):
    self.host, self.mesh, self.rows = host, mesh, rows
    self._device = _device if _device is not None else [None]   # shared by subsets
    n = len(host) if rows is None else len(rows)
    self.shape, self.dtype = (n,) + tuple(host.shape[1:]), host.dtype

  @property
  def device(self) -> jax.Array:
    """The whole array on the device (every example, whatever `rows`)."""
    if self._device[0] is None:
      self._device[0] = parallel.replicate(self.host, self.mesh)
    return self._device[0]

  def positions(self) -> np.ndarray:
    """The positions in `device` of this array's examples."""
    return np.arange(len(self.host)) if self.rows is None else self.rows

  def subset(self, idx: np.ndarray) -> 'DeviceImages':
    return DeviceImages(self.host, self.mesh, self.positions()[np.asarray(idx)], self._device)

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, idx):
    return self.host[idx] if self.rows is None else self.host[self.rows[idx]]

  def __array__(self, dtype=None, copy=None):
    out = self.host if self.rows is None else self.host[self.rows]
    return out if dtype is None else out.astype(dtype)


def device_budget_bytes() -> int:
  """How many bytes of images `data.on_device='auto'` places on a device, for a data set's train and test images
  together: a quarter of its memory as this host's runtime reports it (GPU, TPU), or 2 GiB where it reports none
  (CPU: host memory, copied once). Host-local: `fits_device` makes process 0's answer everyone's."""
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001 - backends without memory statistics
    stats = {}
  limit = stats.get('bytes_limit')
  return int(limit) // 4 if limit else 2 << 30


ON_DEVICE = {'auto': 'auto', True: True, False: False, 'true': True, 'false': False}


def on_device_setting(value):
  """`data.on_device` as 'auto', True or False; the field is a string, so the command line gives 'True'/'False'
  (any case). None for a value that is none of them."""
  return ON_DEVICE.get(value.lower() if isinstance(value, str) else value)


def fits_device(nbytes: int, budget: Optional[int] = None) -> bool:
  """Whether `nbytes` of images fit `budget` (default `device_budget_bytes`), as process 0 answers it, on every
  process (`parallel.broadcast_decision`, decision 'on_device'): the placement decides which programs compile,
  and hosts whose memory statistics differ must compile the same ones. The answer travels as a one-hot over
  (device, host)."""
  fits = nbytes <= (device_budget_bytes() if budget is None else budget)
  return bool(parallel.broadcast_decision(np.array([fits, not fits]), 'on_device', 'for the data set')[0])


def place_dataset(splits: Sequence, mesh, setting, budget: Optional[int] = None) -> list:
  """A data set's `splits` (its train and test images) as `DeviceImages` when `setting` (`data.on_device`) says
  so: True, or 'auto' when the in-memory ones fit `budget` together (`fits_device`: one budget for the data set,
  agreed by every process); else unchanged. Lazy image folders always stay on the host. Each split becomes one
  copy (placed at first use), which every run of the data set shares."""
  setting = on_device_setting(setting)
  in_memory = [isinstance(s, np.ndarray) for s in splits]
  if setting == 'auto':
    setting = fits_device(sum(s.nbytes for s, m in zip(splits, in_memory) if m), budget)
  return [DeviceImages(s, mesh) if setting and m else s for s, m in zip(splits, in_memory)]


def place_images(images, mesh, setting, budget: Optional[int] = None):
  """One image array placed as `place_dataset` places a data set's splits."""
  return place_dataset([images], mesh, setting, budget)[0]


def device_batches(images, labels: np.ndarray, batches: Iterable[np.ndarray], mesh, prefetch: int = 2) -> Iterator[dict]:
  """Global, sharded device batches for each index row of `batches`; this process loads only its slice.
  Loading runs `prefetch` batches ahead in a background thread (decoding lazy image folders overlaps the
  device's work)."""

  def load(row):
    local = row if jax.process_count() == 1 else row[parallel.process_rows(len(row), mesh)]
    return parallel.shard_batch(gather(images, labels, local), mesh, len(row))

  return _prefetched(load, batches, prefetch)


def host_chunks(images, labels: Sequence[np.ndarray], chunks: Iterable[np.ndarray], mesh,
                prefetch: int = 1) -> Iterator[dict]:
  """For host images: the batches of each chunk of index rows [K, R, B] (R runs, run k's labels `labels[k]`) as
  one global batch {'image': [K, R, B, H, W, C], 'label': [K, R, B], 'weight': [K, R, B]} sharded over the
  'data' axis along B; a padding entry of the rows (-1) loads example 0 (`loadable`) with weight 0
  (`batch_weight`). This process loads only its slice of each row. Loading runs `prefetch` chunks ahead in a
  background thread."""

  if hasattr(images, 'train_batches'):
    return _loader_chunks(images, labels, chunks, mesh, prefetch)

  def load(rows):
    rows = np.asarray(rows)
    mine = rows if jax.process_count() == 1 else rows[..., parallel.process_rows(rows.shape[-1], mesh)]
    local = loadable(mine)
    batch = {'image': np.asarray(images[local.reshape(-1)]).reshape(local.shape + tuple(images.shape[1:])),
             'label': np.stack([lab[local[:, k]] for k, lab in enumerate(labels)], 1).astype(np.int32),
             'weight': batch_weight(mine)}
    return parallel.shard_batch(batch, mesh, rows.shape[-1], batch_axis=2)

  return _prefetched(load, chunks, prefetch)


def _loader_chunks(images, labels: Sequence[np.ndarray], chunks: Iterable[np.ndarray], mesh,
                   prefetch: int) -> Iterator[dict]:
  """`host_chunks` for images with a train loader (`image_folder.LazyImages.train_batches`, Grain): the
  loader decodes and transforms every row of the epoch's chunks in its worker processes, in order (padding
  entries as example 0, `loadable`); here its batches are stacked into chunks with their weights and sharded,
  `prefetch` chunks ahead in a background thread."""
  chunks = [np.asarray(c) for c in chunks]
  if not chunks:
    return iter(())
  width = chunks[0].shape[-1]
  columns = np.arange(width) if jax.process_count() == 1 else np.arange(width)[parallel.process_rows(width, mesh)]
  batches = images.train_batches(np.concatenate([loadable(c).reshape(-1, width) for c in chunks]), columns)

  def stacked():
    for rows in chunks:
      mine = rows[..., columns]
      local = loadable(mine)
      image = np.stack([next(batches) for _ in range(local.shape[0] * local.shape[1])])
      yield {'image': image.reshape(local.shape + image.shape[2:]),
             'label': np.stack([lab[local[:, k]] for k, lab in enumerate(labels)], 1).astype(np.int32),
             'weight': batch_weight(mine)}

  return _prefetched(lambda batch: parallel.shard_batch(batch, mesh, width, batch_axis=2), stacked(), prefetch)


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
