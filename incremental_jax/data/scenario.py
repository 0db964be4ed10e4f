"""Class-incremental scenarios: class order, task splits and label remapping.

Labels are remapped once to their *position in the class order*, so task t owns the contiguous label range
`[task_start(t), task_end(t))` and every mask over classes is a simple range.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


from incremental_jax.data import class_orders
from incremental_jax.errors import ConfigError, ScenarioError  # noqa: F401  (raised here)


def class_order(num_classes: int, order: Sequence[int] = (), seed: int | None = 1993) -> np.ndarray:
  """The class order: an explicit permutation, the seeded shuffle used by iCaRL/LUCIR/PODNet, or identity.

  With `order` empty and `seed` given, the order is `np.random.seed(seed); np.random.permutation(n)`, the
  protocol of the iCaRL, LUCIR and PODNet code (seed 1993 for CIFAR-100). `seed=None` keeps the identity.
  """
  if len(order):
    arr = np.asarray(order, dtype=np.int64)
    if arr.ndim != 1 or len(arr) != num_classes or sorted(arr.tolist()) != list(range(num_classes)):
      raise ScenarioError(f'class_order must be a permutation of 0..{num_classes - 1}; got {list(order)[:20]}'
                          f'{"..." if len(order) > 20 else ""} ({len(order)} entries).')
    return arr
  if seed is None or seed < 0:
    return np.arange(num_classes)
  return np.random.RandomState(seed).permutation(num_classes)


def task_sizes(num_classes: int, initial_classes: int, increment: int) -> list[int]:
  """Number of classes per task: `initial_classes` (0 means one `increment`) then `increment` each.

  `increment=0` means a single task with every class (ordinary, non-incremental training).
  """
  if increment < 0 or initial_classes < 0:
    raise ScenarioError(f'initial_classes and increment must be >= 0; got {initial_classes}, {increment}.')
  if initial_classes > num_classes:
    raise ScenarioError(f'initial_classes={initial_classes} exceeds the {num_classes} classes of the data set.')
  if increment == 0:
    if initial_classes not in (0, num_classes):
      raise ScenarioError(f'increment=0 (one task) needs initial_classes 0 or {num_classes}; got {initial_classes}.')
    return [num_classes]
  first = initial_classes or increment
  rest = num_classes - first
  if rest % increment:
    raise ScenarioError(
        f'{num_classes} classes cannot be split into {first} initial classes then tasks of {increment}: '
        f'the remaining {rest} classes are not a multiple of {increment}. '
        f'Choose an increment dividing {rest} (e.g. {[d for d in range(1, rest + 1) if rest % d == 0][:8]}).')
  return [first] + [increment] * (rest // increment)


@dataclasses.dataclass(frozen=True)
class Scenario:
  """Tasks over remapped labels. `order[k]` is the original class id at position k."""
  order: np.ndarray
  sizes: tuple[int, ...]

  @property
  def num_tasks(self) -> int:
    return len(self.sizes)

  @property
  def num_classes(self) -> int:
    return int(sum(self.sizes))

  def task_start(self, t: int) -> int:
    return int(sum(self.sizes[:t]))

  def task_end(self, t: int) -> int:
    return int(sum(self.sizes[:t + 1]))

  def task_of_class(self) -> np.ndarray:
    """[num_classes] task index of each remapped label."""
    return np.repeat(np.arange(self.num_tasks), self.sizes)

  def remap(self, labels: np.ndarray) -> np.ndarray:
    """Original class ids -> position in the class order."""
    inverse = np.empty_like(self.order)
    inverse[self.order] = np.arange(len(self.order))
    return inverse[np.asarray(labels)].astype(np.int32)

  def class_masks(self, t: int) -> dict[str, np.ndarray]:
    """Float masks over remapped labels: `old` (earlier tasks), `new` (task t), `seen` (both)."""
    c = np.arange(self.num_classes)
    old = (c < self.task_start(t)).astype(np.float32)
    new = ((c >= self.task_start(t)) & (c < self.task_end(t))).astype(np.float32)
    return {'old': old, 'new': new, 'seen': old + new}

  def indices_of_classes(self, labels: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Indices of examples whose (remapped) label lies in [lo, hi)."""
    return np.flatnonzero((labels >= lo) & (labels < hi))


def make_scenario(num_classes: int, cfg) -> Scenario:
  """Builds the scenario from the data config (`named_order`, `class_order`, `class_order_seed`,
  `initial_classes`, `increment`). A `named_order` (incremental_jax.data.class_orders) excludes `class_order`."""
  explicit = tuple(cfg.class_order or ())
  if cfg.named_order:
    if explicit:
      raise ConfigError(f'data.named_order={cfg.named_order!r} and data.class_order both fix the class order; '
                        'set only one.')
    explicit = tuple(class_orders.named_order(cfg.named_order, num_classes).tolist())
  order = class_order(num_classes, explicit, cfg.class_order_seed)
  return Scenario(order=order, sizes=tuple(task_sizes(num_classes, int(cfg.initial_classes), int(cfg.increment))))
