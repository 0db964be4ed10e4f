"""Published class orders, as data: a run's class order by name (`data.named_order`), and the order of run k of
a multi-run protocol.

- `podnet_cifar100:k` (k = 0, 1, 2): the three CIFAR-100 orders over which PODNet's paper averages its CIFAR-100
  results (arthurdouillard/incremental_learning.pytorch, `options/data/cifar100_3orders.yaml`; the first one
  is also the `class_order` of its `inclearn/lib/data/datasets.py::iCIFAR100`, taken from iCaRL's code).
- `podnet_imagenet100:0`: PODNet's ImageNet-100 order (`options/data/imagenet100_1order.yaml`). It equals the
  seed-1993 shuffle (`data.class_order_seed=1993`, LUCIR's ImageNet-subset order). Its class ids are the labels
  of PODNet's split lists (`train_100.txt` / `val_100.txt`, 'path label' lines), so it is meaningful only with
  those lists as `data.train_list` / `data.test_list`.

The seed-1993 shuffle of iCaRL/LUCIR/PyCIL (`np.random.seed(1993); np.random.permutation(n)`) is not a named
order: it is `data.class_order_seed` (incremental_jax.data.scenario.class_order).
"""
from __future__ import annotations

import numpy as np

from incremental_jax.errors import ConfigError

PODNET_CIFAR100: tuple[tuple[int, ...], ...] = (
    (
        87, 0, 52, 58, 44, 91, 68, 97, 51, 15, 94, 92, 10, 72, 49, 78, 61, 14, 8, 86, 84, 96, 18, 24, 32,
        45, 88, 11, 4, 67, 69, 66, 77, 47, 79, 93, 29, 50, 57, 83, 17, 81, 41, 12, 37, 59, 25, 20, 80, 73,
        1, 28, 6, 46, 62, 82, 53, 9, 31, 75, 38, 63, 33, 74, 27, 22, 36, 3, 16, 21, 60, 19, 70, 90, 89,
        43, 5, 42, 65, 76, 40, 30, 23, 85, 2, 95, 56, 48, 71, 64, 98, 13, 99, 7, 34, 55, 54, 26, 35, 39,
    ),
    (
        58, 30, 93, 69, 21, 77, 3, 78, 12, 71, 65, 40, 16, 49, 89, 46, 24, 66, 19, 41, 5, 29, 15, 73, 11,
        70, 90, 63, 67, 25, 59, 72, 80, 94, 54, 33, 18, 96, 2, 10, 43, 9, 57, 81, 76, 50, 32, 6, 37, 7,
        68, 91, 88, 95, 85, 4, 60, 36, 22, 27, 39, 42, 34, 51, 55, 28, 53, 48, 38, 17, 83, 86, 56, 35, 45,
        79, 99, 84, 97, 82, 98, 26, 47, 44, 62, 13, 31, 0, 75, 14, 52, 74, 8, 20, 1, 92, 87, 23, 64, 61,
    ),
    (
        71, 54, 45, 32, 4, 8, 48, 66, 1, 91, 28, 82, 29, 22, 80, 27, 86, 23, 37, 47, 55, 9, 14, 68, 25,
        96, 36, 90, 58, 21, 57, 81, 12, 26, 16, 89, 79, 49, 31, 38, 46, 20, 92, 88, 40, 39, 98, 94, 19, 95,
        72, 24, 64, 18, 60, 50, 63, 61, 83, 76, 69, 35, 0, 52, 7, 65, 42, 73, 74, 30, 41, 3, 6, 53, 13,
        56, 70, 77, 34, 97, 75, 2, 17, 93, 33, 84, 99, 51, 62, 87, 5, 15, 10, 78, 67, 44, 59, 85, 43, 11,
    ),
)

PODNET_IMAGENET100: tuple[tuple[int, ...], ...] = (
    (
        68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9, 26, 80, 43, 38, 58, 70, 77, 1, 85,
        19, 17, 50, 28, 53, 13, 81, 45, 82, 6, 59, 83, 16, 15, 44, 91, 41, 72, 60, 79, 52, 20, 10, 31, 54,
        37, 95, 14, 71, 96, 98, 97, 2, 64, 66, 42, 22, 35, 86, 24, 34, 87, 21, 99, 0, 88, 27, 18, 94, 11,
        12, 47, 25, 30, 46, 62, 69, 36, 61, 7, 63, 75, 5, 32, 4, 51, 48, 73, 93, 39, 67, 29, 49, 57, 33,
    ),
)


NAMED_ORDERS: dict[str, tuple[tuple[int, ...], ...]] = {
    'podnet_cifar100': PODNET_CIFAR100,
    'podnet_imagenet100': PODNET_IMAGENET100,
}


def parse_named_order(spec: str) -> tuple[str, int]:
  """'name:k' -> (name, k); a bare 'name' is order 0. Raises ConfigError naming `data.named_order` and the
  valid values."""
  name, _, index = str(spec).partition(':')
  valid = [f'{n}:{k}' for n, orders in NAMED_ORDERS.items() for k in range(len(orders))]
  if name not in NAMED_ORDERS or not (index == '' or index.isdigit()) or int(index or 0) >= len(NAMED_ORDERS[name]):
    raise ConfigError(f"data.named_order={spec!r} is not a published class order; valid: '' (data.class_order "
                      f'or the seeded shuffle), {valid}.')
  return name, int(index or 0)


def named_order(spec: str, num_classes: int) -> np.ndarray:
  """The class order `spec` ('podnet_cifar100:1', ...) as an int64 array; ConfigError when unknown or when the
  data set does not have as many classes as the order."""
  name, k = parse_named_order(spec)
  order = np.asarray(NAMED_ORDERS[name][k], np.int64)
  if len(order) != num_classes:
    raise ConfigError(f'data.named_order={spec!r} orders {len(order)} classes; the data set has {num_classes}.')
  return order


def run_named_order(spec: str, k: int) -> str:
  """The named order of run k of a multi-run protocol (`num_runs`): run k takes the k-th order after `spec`'s,
  so `podnet_cifar100:0` with 3 runs walks PODNet's three orders. ConfigError when there are not enough
  orders."""
  name, first = parse_named_order(spec)
  count = len(NAMED_ORDERS[name])
  if first + k >= count:
    raise ConfigError(f'data.named_order={spec!r} has orders {first}..{count - 1} of {name!r} for the runs; run {k} '
                      f'would need order {first + k}. Use num_runs <= {count - first} or an earlier start order.')
  return f'{name}:{first + k}'
