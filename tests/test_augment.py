import jax
import jax.numpy as jnp
import numpy as np

from incremental_jax.data import augment


def test_random_crop_is_a_window_of_the_zero_padded_image():
  images = jnp.asarray(np.arange(2 * 4 * 4 * 1).reshape(2, 4, 4, 1) + 1, jnp.uint8)
  out = np.asarray(augment.random_crop(jax.random.key(3), images, 2))
  padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
  for b in range(2):
    windows = [padded[b, i:i + 4, j:j + 4] for i in range(5) for j in range(5)]
    assert any(np.array_equal(out[b], w) for w in windows)
  offsets = jax.random.randint(jax.random.key(3), (2, 2), 0, 5)  # the same draws as inside random_crop
  o = np.asarray(offsets)
  np.testing.assert_array_equal(out[0], padded[0, o[0, 0]:o[0, 0] + 4, o[0, 1]:o[0, 1] + 4])


def test_flip_mirrors_about_half_the_images():
  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (200, 3, 5, 1)), jnp.uint8)
  out = np.asarray(augment.random_flip(jax.random.key(0), images))
  same = [np.array_equal(out[i], images[i]) for i in range(200)]
  mirrored = [np.array_equal(out[i], np.asarray(images[i])[:, ::-1]) for i in range(200)]
  assert all(s or m for s, m in zip(same, mirrored))
  assert 70 < sum(mirrored) < 130


def test_normalize_per_channel():
  images = jnp.full((1, 2, 2, 3), 255, jnp.uint8)
  out = augment.normalize(images, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
  np.testing.assert_allclose(np.asarray(out)[0, 0, 0], [1.0, 3.0, 0.5], rtol=1e-6)
