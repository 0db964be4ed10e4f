"""BatchNorm with the ReLU and the residual addition that follow it, differentiated by hand.

`BatchNorm` has the variables, defaults and forward values of `flax.nnx.BatchNorm` (so parameter trees and
checkpoints are unchanged) and takes the operations that follow it in a residual network as arguments:

    out = relu(BN(x) + residual)        BN(x) = (x - mu) * rsqrt(var + eps) * gamma + beta

with batch statistics mu = E[x], var = E[x^2] - mu^2 (flax's fast variance, clipped at 0) over every axis but
the last. Its training-mode gradient is a `jax.custom_vjp` (Ioffe & Szegedy 2015, Sec. 3; the formula of
PyTorch's `native_batch_norm_backward`): with g = d_out * [out > 0] and xhat = (x - mu) * rsqrt(var + eps),

    d_beta = sum(g),  d_gamma = sum(g * xhat),  d_residual = g,
    d_x = gamma * rsqrt(var + eps) * (g - mean(g) - xhat * mean(g * xhat)),

so the backward pass reads x once for the two sums and once for d_x, and saves only x, mu, rsqrt(var + eps) and
the residual. `impl='flax'` (the default, `model.bn_impl`) computes the same composite and leaves it to autodiff.

Measured on the 2-core CPU (the LUCIR ResNet-32 step of benchmarks/vs_torch.py, alternating in one process):
'fused' 933 ms against 905 ms for 'flax' (medians of 7): XLA's fusion of the autodiff graph is already as good,
so 'flax' stays the default and results are unchanged; 'fused' differs from it by float rounding only (gradients
to 1e-7 relative in tests/test_batch_norm.py, which over a whole digits run grows to about one point of
accuracy, as any reordering of float sums does). It has not been measured on a GPU or TPU.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from incremental_jax.errors import ConfigError

BN_IMPLS = ('fused', 'flax')


def batch_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean and (biased, fast) variance over every axis but the last, in float32, as `flax.nnx.BatchNorm`."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  axes = tuple(range(x.ndim - 1))
  mu, mu2 = x.mean(axes), (x * x).mean(axes)
  return mu, jnp.maximum(0.0, mu2 - mu * mu)


def _affine(x, mean, var, scale, bias, epsilon):
  """flax's `_normalize`: (x - mean) * (rsqrt(var + eps) * scale) + bias, in that order of operations."""
  return (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias


def _tail(y, residual, relu):
  y = y if residual is None else y + residual
  return jax.nn.relu(y) if relu else y


def reference_batch_norm(x, scale, bias, epsilon, residual=None, relu=False):
  """Training-mode BatchNorm (+ residual, + ReLU) as the plain composite: (output, batch mean, batch variance)."""
  mean, var = batch_stats(x)
  return _tail(_affine(x, mean, var, scale, bias, epsilon).astype(x.dtype), residual, relu), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(x, scale, bias, residual, epsilon: float, relu: bool):
  return _fused_fwd(x, scale, bias, residual, epsilon, relu)[0]


def _fused_fwd(x, scale, bias, residual, epsilon, relu):
  out, mean, var = reference_batch_norm(x, scale, bias, epsilon, residual, relu)
  return (out, mean, var), (x, mean, jax.lax.rsqrt(var + epsilon), scale, bias, residual)


def _fused_bwd(epsilon, relu, saved, cotangents):
  x, mean, rstd, scale, bias, residual = saved
  d_out = cotangents[0]   # the batch statistics only feed the stop-gradient running averages
  f32 = jnp.promote_types(x.dtype, jnp.float32)
  xhat = (x.astype(f32) - mean) * rstd
  g = d_out.astype(f32)
  if relu:
    pre = xhat * scale + bias
    g = jnp.where((pre if residual is None else pre + residual.astype(f32)) > 0, g, 0.0)
  axes = tuple(range(x.ndim - 1))
  d_bias, d_scale = g.sum(axes), (g * xhat).sum(axes)
  n = x.size // x.shape[-1]
  d_x = (scale * rstd) * (g - d_bias / n - xhat * (d_scale / n))
  d_residual = None if residual is None else g.astype(residual.dtype)
  return d_x.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype), d_residual


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_batch_norm(x, scale, bias, epsilon, residual=None, relu=False):
  """`reference_batch_norm` with the hand-written backward pass (module docstring)."""
  return _fused(x, scale, bias, residual, float(epsilon), bool(relu))


class BatchNorm(nnx.BatchNorm):
  """`nnx.BatchNorm` over the last axis whose call also applies a residual addition and a ReLU:
  `bn(x, use_running_average, residual=r, relu=True)` is `relu(bn(x) + r)`. In training mode with
  `impl='fused'` the three are one custom-VJP function (module docstring)."""

  def __init__(self, num_features: int, *, impl: str = 'flax', **kwargs):
    if impl not in BN_IMPLS:
      raise ConfigError(f"model.bn_impl must be one of {list(BN_IMPLS)}; got {impl!r}.")
    super().__init__(num_features, **kwargs)
    self.impl = impl

  def __call__(self, x, use_running_average: Optional[bool] = None, *, residual=None, relu: bool = False):
    inference = self.use_running_average if use_running_average is None else use_running_average
    if inference or self.impl == 'flax' or self.axis not in (-1, x.ndim - 1):
      return _tail(super().__call__(x, use_running_average=use_running_average), residual, relu)
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    scale, bias = self.scale[...].astype(jnp.float32), self.bias[...].astype(jnp.float32)
    out, mean, var = fused_batch_norm(x, scale, bias, self.epsilon,
                                      None if residual is None else residual.astype(dtype), relu)
    self.mean[...] = jax.lax.stop_gradient(self.momentum * self.mean[...] + (1 - self.momentum) * mean)
    self.var[...] = jax.lax.stop_gradient(self.momentum * self.var[...] + (1 - self.momentum) * var)
    return out
