"""Classifier heads. A head maps the embedding [B, D] to `{'logits': [B, C], ...}` over *all* classes of the
scenario (allocated once; unseen classes are masked by the losses and receive no updates).

Each head declares `class_axes`: for each of its class-indexed parameters, the axis that runs over classes.
The trainer uses it to freeze old classes and to leave unseen classes untouched (`train.head_update_mask`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class LinearHead(nnx.Module):
  """Fully connected classifier `x W + b` (PyTorch `nn.Linear` initialisation: U(-1/sqrt(D), 1/sqrt(D)))."""
  class_axes = {'kernel': -1, 'bias': -1}

  def __init__(self, in_features: int, num_classes: int, *, rngs: nnx.Rngs, use_bias: bool = True):
    bound = 1.0 / in_features**0.5
    init = nnx.initializers.uniform(2 * bound)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, num_classes)) - bound)
    self.bias = nnx.Param(init(rngs.params(), (num_classes,)) - bound) if use_bias else None

  def __call__(self, x: jax.Array) -> dict:
    logits = x @ self.kernel[...]
    if self.bias is not None:
      logits = logits + self.bias[...]
    return {'logits': logits}


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||_2, eps) along `axis` (torch.nn.functional.normalize)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)
