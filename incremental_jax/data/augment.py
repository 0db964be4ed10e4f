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


def augment_batch(key: jax.Array, images: jax.Array, *, mean: Sequence[float], std: Sequence[float],
                  crop_padding: int = 0, flip: bool = False, brightness: float = 0.0) -> jax.Array:
  """uint8 batch -> augmented, normalised float32 batch: crop, flip, brightness, then normalisation."""
  k_crop, k_flip, k_bright = jax.random.split(key, 3)
  x = random_crop(k_crop, images, crop_padding)
  if flip:
    x = random_flip(k_flip, x)
  if brightness > 0:
    x = random_brightness(k_bright, x.astype(jnp.float32) / 255.0, brightness) * 255.0
  return normalize(x, mean, std)


def make_augment_fn(aug_cfg, mean, std) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """`(key, uint8 images) -> float32 images` from the `data.augment` config section."""
  return functools.partial(augment_batch, mean=tuple(mean), std=tuple(std),
                           crop_padding=int(aug_cfg.crop_padding), flip=bool(aug_cfg.flip),
                           brightness=float(aug_cfg.brightness))
