"""A Grain loader whose worker processes outlive an epoch: one `grain.MapDataset` pipeline (`.map(transform)
.batch(width)`, `mp_prefetch` over `workers` processes) reads its items from a row table the training process
fills call after call, so the workers' start-up (a spawned process that imports Grain, about 2 s) is paid once
per stream instead of once per epoch, as `torch.utils.data.DataLoader(persistent_workers=True)` does.

The table is a small memory-mapped file: a header (rows published, closed flag) and a ring of `capacity` rows
of `width` items. Element b of the pipeline is row b of the stream; a worker asked for an item of a row not yet
published waits for it (`_RowTable.__getitem__`). Grain's `mp_prefetch` gives worker k the batches k, k + W, ...
and interleaves them back in order, so the stream's batches are the rows' batches in order, whatever the number
of workers (`grain/_src/python/dataset/transformations/process_prefetch.py::multiprocess_prefetch`). A row's
slot is rewritten only after its batch came back, so the ring never overtakes a worker. Batches come back through
the workers' pipes, not Grain's shared memory (see `GrainStream.__init__`). `close` (also at exit, and when the
owning `LazyImages` is collected) raises the closed flag so waiting workers stop at once; a worker whose training
process died (SIGKILL) removes the table and exits.
"""
from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401  (imported first: its exit handler must run after `_close_all`)
import os
import tempfile
import threading
import time
import weakref
from typing import Callable, Iterator

import numpy as np

_HEADER = 2                 # uint64 words: rows published, closed flag
_ITEMS = 1 << 50            # the source's length: more items than any run asks for
_NO_SHM = 1 << 62           # bytes: arrays at least this large would go through shared memory
_MAX_WAIT_S = 0.02          # a waiting worker polls the table at most this far apart
_PARENT_POLL_S = 0.5        # a worker checks this often that the training process is alive


class StreamClosed(RuntimeError):
  """Raised in a worker waiting for a row of a stream that was closed."""


class _RowTable:
  """The random-access Grain source of a stream: item j is column j % width of row j // width, read from the
  table file at `path` (opened lazily in each worker); waits until that row is published."""

  def __init__(self, path: str, capacity: int, width: int):
    self.path, self.capacity, self.width = path, capacity, width
    self._table = self._parent = None

  def __getstate__(self):
    return {'path': self.path, 'capacity': self.capacity, 'width': self.width, '_table': None, '_parent': None}

  def __len__(self) -> int:
    return _ITEMS

  def __getitem__(self, j):
    row, column = divmod(int(j), self.width)
    if self._table is None:
      self._table, self._parent = np.memmap(self.path, np.uint64, 'r'), os.getppid()
      # A worker whose buffers are full never comes back here: a thread watches for the training process's death.
      threading.Thread(target=_exit_with_parent, args=(self.path, self._parent), daemon=True).start()
    table, wait = self._table, 1e-4
    while int(table[0]) <= row:
      if table[1]:
        raise StreamClosed(f'the loader stream {self.path} was closed')
      if os.getppid() != self._parent:   # the training process was killed: nobody will publish or stop us
        _remove(self.path)
        os._exit(1)
      time.sleep(wait)
      wait = min(2 * wait, _MAX_WAIT_S)
    start = _HEADER + ((row % self.capacity) * self.width + column) * 4
    return np.array(table[start:start + 4])


def _exit_with_parent(path: str, parent: int) -> None:
  """In a worker: once the training process `parent` is gone (SIGKILL), removes the table and exits."""
  while os.getppid() == parent:
    time.sleep(_PARENT_POLL_S)
  _remove(path)
  os._exit(1)


_OPEN: 'weakref.WeakSet[GrainStream]' = weakref.WeakSet()


def _close_all() -> None:
  """At exit, before multiprocessing's own exit handler: close the open streams (their waiting workers see the
  closed flag and stop at once instead of being killed after Grain's timeout)."""
  for stream in list(_OPEN):
    stream.close()


atexit.register(_close_all)


class GrainStream:
  """Batches of `width` items made by `transform` (an item is a uint64 [4] row of the caller's item table) in
  `workers` Grain worker processes that persist across `batches` calls. One call at a time; a call left before
  its end closes the stream (its rows' batches may still wait in the workers' buffers)."""

  def __init__(self, transform: Callable, width: int, workers: int, prefetch: int):
    import grain
    self.width, self.workers = int(width), int(workers)
    self.capacity = 2 * self.workers * (3 * int(prefetch) + 2) + 8   # rows: more than the workers read ahead
    fd, self.path = tempfile.mkstemp(prefix='incremental_jax_rows_', suffix='.u64')
    os.close(fd)
    self._table = np.memmap(self.path, np.uint64, 'w+', shape=(_HEADER + self.capacity * self.width * 4,))
    self.published = self.consumed = 0
    self.owner = None
    self.closed = False
    try:
      ds = grain.MapDataset.source(_RowTable(self.path, self.capacity, self.width)).map(transform).batch(self.width)
      ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=int(prefetch)))
      # Batches come back through the workers' queues, not shared memory: Grain's parent side keeps the last
      # elements in reference cycles, whose shared memory blocks then outlive the process ("leaked shared_memory
      # objects" warnings); a pipe carries a batch in milliseconds, small beside decoding it.
      ds = grain.experimental.WithOptionsIterDataset(ds, grain.experimental.DatasetOptions(min_shm_size=_NO_SHM))
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers,
                                                       per_worker_buffer_size=int(prefetch)))
      self._iterator = iter(ds)
    except BaseException:
      _remove(self.path)
      raise
    _OPEN.add(self)

  @property
  def busy(self) -> bool:
    """Whether a call is under way (or was left without finishing and not yet collected)."""
    return self.owner is not None

  def _publish(self, row: np.ndarray) -> None:
    start = _HEADER + (self.published % self.capacity) * self.width * 4
    self._table[start:start + self.width * 4] = row.reshape(-1)
    self.published += 1
    self._table[0] = self.published   # after the row: a worker that sees the count sees the row

  def batches(self, items: np.ndarray) -> Iterator[np.ndarray]:
    """uint8 batches [width, ...], one per row of `items` uint64 [n, width, 4], in order."""
    if self.closed or self.busy:
      raise RuntimeError('GrainStream.batches: the stream is closed or serving another call.')
    token = self.owner = object()
    items = np.asarray(items, np.uint64).reshape(len(items), self.width, 4)
    sent = done = 0
    try:
      while done < len(items):
        while sent < len(items) and self.published < self.consumed + self.capacity:
          self._publish(items[sent])
          sent += 1
        batch = next(self._iterator)
        self.consumed += 1
        done += 1
        if done == len(items) and self.owner is token:
          self.owner = None   # free for the next call even if this generator is not run to its end
        yield batch
    finally:
      if self.owner is token:
        self.owner = None
        if done < len(items):
          self.close()

  def close(self) -> None:
    """Stops the workers and removes the table; idempotent."""
    if self.closed:
      return
    self.closed = True
    _OPEN.discard(self)
    self._table[1] = 1
    try:
      self._iterator.close()
    finally:
      del self._iterator, self._table
      _remove(self.path)


def _remove(path: str) -> None:
  try:
    os.unlink(path)
  except OSError:
    pass
