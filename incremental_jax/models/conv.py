"""Convolution lowerings, chosen by `model.conv_impl`.

XLA:CPU computes the weight gradient of a convolution as another convolution whose "batch" is the input's
channels and whose kernel is the whole output map; for the first stage of a CIFAR ResNet (32x32 maps, 16
channels) that takes several times the forward convolution, and XLA fuses the recomputation of earlier
activations into the transposes feeding it. `taps_conv` keeps XLA's forward and input-gradient convolutions and
computes the weight gradient of a kh x kw convolution with stride s as kh*kw matrix products, one per tap:

    dW[i, j] = sum_{b, h, w} X_pad[b, s*h + i, s*w + j, :]^T dY[b, h, w, :]      ([C_in, C_out] each),

which is the same sum as the convolution's, in another order (results agree to float rounding).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax


def _xla_conv(x, kernel, strides, padding, dimension_numbers, precision):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=dimension_numbers,
                                  precision=precision)


def tap_weight_gradient(x: jax.Array, dy: jax.Array, kernel_shape: tuple, padding, strides=(1, 1)) -> jax.Array:
  """dL/dW [kh, kw, C_in, C_out] of an NHWC/HWIO convolution from its input `x` [B, H, W, C_in] and output
  gradient `dy` [B, H', W', C_out], as one matrix product per tap (module docstring); with stride s the tap
  (i, j) reads X_pad[b, s*h + i, s*w + j]."""
  kh, kw, cin, cout = kernel_shape
  (pt, pb), (pl, pr) = padding
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  _, ho, wo, _ = dy.shape
  d = dy.reshape(-1, cout)
  taps = [[xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :].reshape(-1, cin).T @ d
           for j in range(kw)] for i in range(kh)]
  return jnp.stack([jnp.stack(row) for row in taps])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _tap_conv(x, kernel, strides, padding, dimension_numbers, precision):
  return _xla_conv(x, kernel, strides, padding, dimension_numbers, precision)


def _tap_conv_fwd(x, kernel, strides, padding, dimension_numbers, precision):
  return _xla_conv(x, kernel, strides, padding, dimension_numbers, precision), (x, kernel)


def _tap_conv_bwd(strides, padding, dimension_numbers, precision, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda v: _xla_conv(v, kernel, strides, padding, dimension_numbers, precision), x)
  (dx,) = input_vjp(dy)
  return dx, tap_weight_gradient(x, dy, kernel.shape, padding, strides).astype(kernel.dtype)


_tap_conv.defvjp(_tap_conv_fwd, _tap_conv_bwd)

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def taps_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
              feature_group_count=1, batch_group_count=1, precision=None, preferred_element_type=None,
              out_sharding=None, min_pixels: int = 0):
  """Drop-in for `lax.conv_general_dilated` (what `nnx.Conv` calls): undilated, ungrouped NHWC convolutions with
  explicit padding whose input has at least `min_pixels` positions (H * W) use the per-tap weight gradient;
  every other convolution is passed to XLA unchanged."""
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  plain = (not _dilated(lhs_dilation) and not _dilated(rhs_dilation)
           and feature_group_count == 1 and batch_group_count == 1 and preferred_element_type is None
           and out_sharding is None
           and not isinstance(padding, str) and lhs.shape[1] * lhs.shape[2] >= min_pixels
           and dn == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                    feature_group_count, batch_group_count, precision, preferred_element_type,
                                    out_sharding=out_sharding)
  return _tap_conv(lhs, rhs, tuple(int(v) for v in window_strides), tuple(tuple(int(v) for v in p) for p in padding),
                   _NHWC, precision)


def _dilated(d) -> bool:
  return d is not None and any(int(v) != 1 for v in d)


# 'taps_large': the per-tap weight gradient only on maps of at least 16x16, where it measured faster on CPU
# (CIFAR ResNet-32 step 1.3x, benchmarks/vs_torch.py); on 8x8 digits XLA's own was faster.
CONV_IMPLS: dict[str, Callable] = {'xla': lax.conv_general_dilated, 'taps': taps_conv,
                                   'taps_large': functools.partial(taps_conv, min_pixels=256)}


def resolve(name: str) -> str:
  """'auto' is 'taps_large' on CPU and 'xla' on GPU/TPU (whose convolution libraries have fast weight
  gradients)."""
  if name == 'auto':
    return 'taps_large' if jax.default_backend() == 'cpu' else 'xla'
  if name not in CONV_IMPLS:
    raise ValueError(f"model.conv_impl must be 'auto' or one of {sorted(CONV_IMPLS)}; got {name!r}.")
  return name


def conv_fn(name: str) -> Callable:
  return CONV_IMPLS[resolve(name)]
