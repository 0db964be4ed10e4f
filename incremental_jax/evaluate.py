"""Evaluation: inference over a data split, CNN (classifier) and NME (nearest mean of exemplars) accuracy on
all seen classes, on old and new classes, and per task."""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from incremental_jax import memory as memory_lib
from incremental_jax import parallel
from incremental_jax.data import pipeline
from incremental_jax.registry import Registry


# The second view of an image whose embedding enters the NME class means (`memory.nme_view`), on NHWC batches:
# 'hflip' mirrors the width (the usual flip); 'channel_reverse' reverses the channel axis, RGB -> BGR, which is
# what LUCIR's official CIFAR code computes with `[:, :, :, ::-1]` on HWC arrays (it calls it a flip).
VIEWS: Registry[Callable] = Registry('a view', {
    'hflip': lambda x: x[:, :, ::-1, :],
    'channel_reverse': lambda x: x[..., ::-1],
})


def make_predict_fn(model, mesh, preprocess: Callable, batch_size: int, outputs=('logits', 'embedding')) -> Callable:
  """`predict(params, batch_stats, images, flip=False) -> {name: np.ndarray [N, ...]}` in inference mode over a
  host image array (any length; the last batch is padded and trimmed); `flip` True is the 'hflip' view, or name
  a view of `VIEWS`. Each process loads its share of every batch; the outputs are replicated (gathered over the
  mesh), so every process gets all of them."""
  parallel.check_batch_divisible(batch_size, 'eval.batch_size')

  batch_sharding = parallel.batch_sharded(mesh)

  def inputs(images, rows):
    """The batch: `images` itself, or its examples `rows` when `images` is the whole device array."""
    return images if rows is None else jax.lax.with_sharding_constraint(images[rows], batch_sharding)

  @functools.partial(jax.jit, out_shardings=parallel.replicated(mesh))
  def forward(params, batch_stats, images, rows, flip):
    x = preprocess(inputs(images, rows))
    x = jnp.where(flip, x[:, :, ::-1, :], x)
    out, _ = model.apply(params, batch_stats, x, train=False)
    return {k: out[k] for k in outputs}

  @functools.partial(jax.jit, out_shardings=parallel.replicated(mesh), static_argnums=4)
  def forward_view(params, batch_stats, images, rows, view):
    x = VIEWS.lookup(view, 'memory.nme_view')(preprocess(inputs(images, rows)))
    out, _ = model.apply(params, batch_stats, x, train=False)
    return {k: out[k] for k in outputs}

  def predict(params, batch_stats, images, flip=False) -> dict:
    rows, n = pipeline.padded_rows(len(images), batch_size)
    if isinstance(flip, str) and flip != 'hflip':
      run = lambda x, r: forward_view(params, batch_stats, x, r, flip)
    else:
      run = lambda x, r: forward(params, batch_stats, x, r, np.bool_(flip))
    if isinstance(images, pipeline.DeviceImages):   # gathered on the device from the run's one copy
      positions = images.positions().astype(np.int32)
      chunks = [run(images.device, parallel.host_input(positions[r], mesh)) for r in rows]
    else:
      ident = np.arange(len(images))
      chunks = [run(b['image'], None) for b in pipeline.device_batches(images, ident, rows, mesh)]
    host = jax.device_get(chunks)
    return {k: np.concatenate([c[k] for c in host])[:n] for k in outputs}

  return predict


def accuracy(pred: np.ndarray, labels: np.ndarray) -> Optional[float]:
  """Percent of correct predictions; None for an empty set."""
  return float(100.0 * np.mean(pred == labels)) if len(labels) else None


def accuracy_report(pred: np.ndarray, labels: np.ndarray, scenario, t: int) -> dict:
  """Accuracy after task t on the test examples of the seen classes: `all`, `old` (earlier tasks' classes),
  `new` (task t's classes) and `per_task` (one entry per task 0..t)."""
  start, end = scenario.task_start(t), scenario.task_end(t)
  report = {'all': accuracy(pred, labels), 'old': accuracy(pred[labels < start], labels[labels < start]),
            'new': accuracy(pred[labels >= start], labels[labels >= start])}
  report['per_task'] = [accuracy(pred[(labels >= scenario.task_start(j)) & (labels < scenario.task_end(j))],
                                 labels[(labels >= scenario.task_start(j)) & (labels < scenario.task_end(j))])
                        for j in range(t + 1)]
  return report


def evaluate_task(predict: Callable, params, batch_stats, test_images, test_labels: np.ndarray, scenario, t: int,
                  nme_means: Optional[np.ndarray] = None) -> dict:
  """CNN (and NME when class means are given) reports after task t, on the seen classes' test examples."""
  seen = test_labels < scenario.task_end(t)
  idx = np.flatnonzero(seen)
  labels = test_labels[idx]
  out = predict(params, batch_stats, take(test_images, idx))
  seen_mask = scenario.class_masks(t)['seen']
  logits = np.where(seen_mask[None] > 0, out['logits'], -np.inf)
  record = {'cnn': accuracy_report(np.argmax(logits, axis=1), labels, scenario, t), 'nme': None}
  if nme_means is not None:
    pred = memory_lib.nme_predict(out['embedding'], nme_means, seen_mask)
    record['nme'] = accuracy_report(pred, labels, scenario, t)
  return record


def take(images, idx: np.ndarray):
  """A view of `images` restricted to `idx` that stays lazy for lazy image containers (and on the device for
`pipeline.DeviceImages`)."""
  if isinstance(images, np.ndarray):
    return images[idx]
  if isinstance(images, pipeline.DeviceImages):
    return images.subset(idx)
  return _Subset(images, idx)


class _Subset:
  def __init__(self, images, idx):
    self.images, self.idx = images, np.asarray(idx)
    self.shape = (len(self.idx),) + tuple(images.shape[1:])

  def __len__(self):
    return len(self.idx)

  def __getitem__(self, i):
    return self.images[self.idx[i]]
