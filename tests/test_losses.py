import jax
import jax.numpy as jnp
import numpy as np
import pytest

from incremental_jax.losses import cross_entropy, kd_kl, masked_mean, sigmoid_bce


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_masked_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 6)).astype(np.float32)
  labels = np.array([0, 2, 1, 3, 2])
  mask = np.array([1, 1, 1, 1, 0, 0], np.float32)
  ref = -_log_softmax(logits[:, :4])[np.arange(5), labels]
  np.testing.assert_allclose(cross_entropy(logits, labels, mask), ref, rtol=1e-5)
  # unseen classes get exactly zero gradient
  g = jax.grad(lambda z: cross_entropy(z, labels, mask).sum())(jnp.asarray(logits))
  assert np.all(np.asarray(g)[:, 4:] == 0)


def test_kd_kl_matches_numpy_on_old_classes():
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(2, 4, 5)).astype(np.float32)
  mask = np.array([1, 1, 1, 0, 0], np.float32)
  T = 2.0
  lp_s, lp_t = _log_softmax(s[:, :3] / T), _log_softmax(t[:, :3] / T)
  ref = (np.exp(lp_t) * (lp_t - lp_s)).sum(-1)
  np.testing.assert_allclose(kd_kl(s, t, T, mask), ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(kd_kl(t, t, T, mask), 0.0, atol=1e-6)


def test_sigmoid_bce_and_masked_mean():
  logits = np.array([[0.5, -1.0, 3.0]], np.float32)
  targets = np.array([[1.0, 0.2, 0.0]], np.float32)
  mask = np.array([1, 1, 0], np.float32)
  p = 1 / (1 + np.exp(-logits))
  ref = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))[:, :2].sum(-1)
  np.testing.assert_allclose(sigmoid_bce(logits, targets, mask), ref, rtol=1e-5)
  assert float(masked_mean(jnp.array([1.0, 3.0, 5.0]), jnp.array([1.0, 0.0, 1.0]))) == pytest.approx(3.0)
  assert float(masked_mean(jnp.array([1.0]), jnp.array([0.0]))) == 0.0
