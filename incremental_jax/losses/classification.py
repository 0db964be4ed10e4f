"""Classification losses over the classes seen so far."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def masked_logits(logits: jax.Array, class_mask: jax.Array) -> jax.Array:
  """Logits [B, C] with the classes where `class_mask` [C] is 0 set to the dtype's lowest value, so they get
  zero probability and zero gradient under a softmax."""
  return jnp.where(class_mask > 0, logits, jnp.finfo(logits.dtype).min)


def masked_mean(values: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Mean of `values` [B] weighted by `weights` [B] (0 where an example does not count); 0 if all weights are 0."""
  if weights is None:
    return values.mean()
  weights = weights.astype(values.dtype)
  return (values * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def cross_entropy(logits: jax.Array, labels: jax.Array, class_mask: jax.Array | None = None) -> jax.Array:
  """Softmax cross-entropy [B] of integer `labels` over the classes in `class_mask` (all when None):
  -log( exp(z_y) / sum_{c in mask} exp(z_c) )."""
  if class_mask is not None:
    logits = masked_logits(logits, class_mask)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def sigmoid_bce(logits: jax.Array, targets: jax.Array, class_mask: jax.Array) -> jax.Array:
  """Binary cross-entropy [B] summed over the classes in `class_mask` [C], with targets in [0, 1] [B, C]
  (iCaRL, Rebuffi et al. 2017, Alg. 3: one-hot targets for new classes, old model sigmoids for old ones)."""
  return (optax.sigmoid_binary_cross_entropy(logits, targets) * class_mask).sum(-1)
