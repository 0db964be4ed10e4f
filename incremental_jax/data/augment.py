"""On-device data augmentation: pure jnp functions applied to a whole uint8 batch inside the jitted step."""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 [B, H, W, C] -> float32 (x / 255 - mean) / std, per channel."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def random_crop(key: jax.Array, images: jax.Array, padding: int) -> jax.Array:
  """Zero-pads each side by `padding` and crops back to the input size at a random offset per image
  (torchvision `RandomCrop(size, padding)`)."""
  if padding <= 0:
    return images
  b, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(key, (b, 2), 0, 2 * padding + 1)

  def crop(img, off):
    return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))

  return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
  """Mirrors each image left-right with probability 1/2."""
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1, :], images)


def random_brightness(key: jax.Array, x: jax.Array, max_delta: float) -> jax.Array:
  """Adds a uniform offset in [-max_delta, max_delta] per image to [0, 1]-scaled pixels and clips
  (torchvision `ColorJitter(brightness=...)` is multiplicative; this is the additive form used by
  `tf.image.random_brightness`)."""
  delta = jax.random.uniform(key, (x.shape[0], 1, 1, 1), minval=-max_delta, maxval=max_delta)
  return jnp.clip(x + delta, 0.0, 1.0)


def multiply_brightness(key: jax.Array, images: jax.Array, brightness: float) -> jax.Array:
  """torchvision's `ColorJitter(brightness=b)` on uint8 images (`transforms/transforms.py::ColorJitter`,
  `functional.adjust_brightness`): each image times a factor drawn uniformly from [max(0, 1 - b), 1 + b], clipped
  to [0, 255] and truncated to an integer, as PIL's `ImageEnhance.Brightness` (a blend with black) does on the
  8-bit images the official code jitters. Returns float32 holding integers in [0, 255]."""
  factor = jax.random.uniform(key, (images.shape[0], 1, 1, 1), minval=max(0.0, 1.0 - brightness),
                              maxval=1.0 + brightness)
  return jnp.floor(jnp.clip(images.astype(jnp.float32) * factor, 0.0, 255.0))


BRIGHTNESS_MODES = ('multiply', 'add')


def augment_batch(key: jax.Array, images: jax.Array, *, mean: Sequence[float], std: Sequence[float],
                  crop_padding: int = 0, flip: bool = False, brightness: float = 0.0,
                  brightness_mode: str = 'multiply') -> jax.Array:
  """uint8 batch -> augmented, normalised float32 batch: crop, flip, brightness, then normalisation.

  `brightness_mode`: 'multiply' (torchvision's ColorJitter, `multiply_brightness`) or 'add' (`random_brightness`).
  """
  k_crop, k_flip, k_bright = jax.random.split(key, 3)
  x = random_crop(k_crop, images, crop_padding)
  if flip:
    x = random_flip(k_flip, x)
  if brightness > 0:
    if brightness_mode == 'multiply':
      x = multiply_brightness(k_bright, x, brightness)
    elif brightness_mode == 'add':
      x = random_brightness(k_bright, x.astype(jnp.float32) / 255.0, brightness) * 255.0
    else:
      raise ValueError(f'brightness_mode={brightness_mode!r}; valid: {BRIGHTNESS_MODES}.')
  return normalize(x, mean, std)


def make_augment_fn(aug_cfg, mean, std) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """`(key, uint8 images) -> float32 images` from the `data.augment` config section. With
  `random_resized_crop` the host loader has already cropped the images (`data.host_transforms`), so no crop here;
  flip, brightness and normalisation stay on the device."""
  crop_padding = 0 if aug_cfg.get('random_resized_crop', False) else int(aug_cfg.crop_padding)
  return functools.partial(augment_batch, mean=tuple(mean), std=tuple(std),
                           crop_padding=crop_padding, flip=bool(aug_cfg.flip),
                           brightness=float(aug_cfg.brightness),
                           brightness_mode=str(aug_cfg.brightness_mode))
