"""Data sources: every data set becomes one `Dataset` of uint8 HWC images and integer labels.

A source is a function `load(data_config) -> Dataset`, registered by name in `SOURCES`. Images are kept on
the host; an image container may be a NumPy array or any lazy array-like object that supports
`images[np.ndarray_of_indices]` (returning a uint8 `[n, H, W, C]` array), `len(images)` and `.shape`
(used by the ImageNet-style folder source, where the whole set does not fit in memory).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from typing import Any, Callable, Sequence

import numpy as np


from incremental_jax.errors import DataError  # noqa: F401  (raised here)
from incremental_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A classification data set with a train and a test split.

  Attributes:
    name: the source name (`digits`, `cifar100`, ...).
    train_images, test_images: uint8 arrays (or lazy array-likes) of shape [N, H, W, C].
    train_labels, test_labels: int32 arrays of shape [N] with values in [0, num_classes).
    num_classes: number of classes.
    class_names: one name per class id.
    mean, std: per-channel normalisation statistics on the [0, 1] scale.
    location: where it was read (a folder, TFDS's directory, 'scikit-learn (bundled)'), for messages.
  """
  name: str
  train_images: Any
  train_labels: np.ndarray
  test_images: Any
  test_labels: np.ndarray
  num_classes: int
  class_names: Sequence[str]
  mean: Sequence[float]
  std: Sequence[float]
  location: str = ''

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])


def check_dataset(ds: Dataset) -> Dataset:
  """Raises DataError unless labels are in range and every class has train and test images."""
  for split, images, labels in (('train', ds.train_images, ds.train_labels),
                                ('test', ds.test_images, ds.test_labels)):
    if len(images) != len(labels):
      raise DataError(f'{ds.name}: {split} split has {len(images)} images but {len(labels)} labels.')
    if len(labels) and (labels.min() < 0 or labels.max() >= ds.num_classes):
      bad = labels[(labels < 0) | (labels >= ds.num_classes)]
      raise DataError(f'{ds.name}: {split} labels must lie in [0, {ds.num_classes}); found {sorted(set(bad.tolist()))[:10]}.')
    counts = np.bincount(labels, minlength=ds.num_classes)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
      names = [ds.class_names[i] for i in empty[:10]]
      raise DataError(f'{ds.name}: class(es) {names} have no {split} images; every class needs both splits.')
  return ds


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of uint8 images on the [0, 1] scale."""
  x = np.asarray(images, np.float64) / 255.0
  return tuple(x.mean(axis=(0, 1, 2)).tolist()), tuple(x.std(axis=(0, 1, 2)).tolist())


def bundled_digits() -> tuple[np.ndarray, np.ndarray]:
  """(pixels [1797, 8, 8] float64 in 0..16, target [1797]) of scikit-learn's bundled digits, as
  `sklearn.datasets.load_digits()` gives them (`images`, `target`).

  The file load_digits reads (`sklearn/datasets/data/digits.csv.gz`: 64 pixels then the label per row) is read
  directly, which spares importing scikit-learn (1-2 s of the quick start); a scikit-learn without that file
  goes through load_digits."""
  spec = importlib.util.find_spec('sklearn')
  for root in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(root, 'datasets', 'data', 'digits.csv.gz')
    if os.path.isfile(path):
      rows = np.loadtxt(path, delimiter=',')
      return rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(int)
  from sklearn import datasets as sk_datasets
  digits = sk_datasets.load_digits()
  return digits.images, digits.target


def load_digits(cfg) -> Dataset:
  """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), embedded: needs no download.

  Pixel values 0..16 are scaled to uint8 0..255; a stratified split keeps `cfg.test_fraction` (default 0.2)
  of each class for testing, fixed by `cfg.split_seed`.
  """
  pixels, target = bundled_digits()
  images = np.clip(np.round(pixels * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
  labels = target.astype(np.int32)
  test_fraction = float(cfg.test_fraction)
  rng = np.random.default_rng(int(cfg.split_seed))
  test_mask = np.zeros(len(labels), bool)
  for c in range(10):
    idx = np.flatnonzero(labels == c)
    rng.shuffle(idx)
    test_mask[idx[:int(round(test_fraction * len(idx)))]] = True
  mean, std = channel_stats(images[~test_mask])
  return Dataset(name='digits', train_images=images[~test_mask], train_labels=labels[~test_mask],
                 test_images=images[test_mask], test_labels=labels[test_mask], num_classes=10,
                 class_names=[str(i) for i in range(10)], mean=mean, std=std,
                 location='scikit-learn (bundled, sklearn.datasets.load_digits)')


def _lazy(module: str, attr: str) -> Callable:
  def load(cfg):
    return getattr(importlib.import_module(f'incremental_jax.data.{module}'), attr)(cfg)
  load.__name__ = attr
  return load


SOURCES: Registry[Callable[[Any], Dataset]] = Registry('a data set', {
    'digits': load_digits,
    'cifar10': _lazy('cifar', 'load_cifar10'),
    'cifar100': _lazy('cifar', 'load_cifar100'),
    'image_folder': _lazy('image_folder', 'load_image_folder'),
})


def with_normalisation(ds: Dataset, cfg) -> Dataset:
  """`ds` with `data.mean` / `data.std` when set (a method's official constants); () keeps the source's."""
  mean, std = tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)
  if not mean and not std:
    return ds
  channels = ds.image_shape[-1]
  if len(mean) != channels or len(std) != channels or min(std) <= 0:
    raise DataError(f'data.mean and data.std need {channels} values each (std > 0), or both (); got mean={mean}, '
                    f'std={std}.')
  return dataclasses.replace(ds, mean=mean, std=std)


def load_dataset(cfg) -> Dataset:
  """Loads the data set named `cfg.name` (see SOURCES), checks it and applies `data.mean` / `data.std`."""
  return with_normalisation(check_dataset(SOURCES.lookup(cfg.name, 'data.name')(cfg)), cfg)
