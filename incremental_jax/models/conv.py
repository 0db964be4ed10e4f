"""Convolution lowerings; `backend_tuning.conv_lowering` says which one each backend uses.

In a ResNet's training step every convolution input is an elementwise function (BatchNorm, ReLU, residual
additions) of earlier convolution outputs. XLA:CPU fuses such producers into each consumer, and the consumer
that needs the input in another layout, the transpose feeding the weight-gradient convolution, then recomputes
the whole chain back to the previous convolutions, one scalar at a time: with plain XLA convolutions those
transposes took 636 ms of a 1.46 s CIFAR ResNet-32 step (96 transposes of up to 38 ms each, against 2 ms for a
transpose of a materialised array). `materialized_conv` cuts the chain: it routes the input through a matrix
product with the identity, an operation XLA cannot fuse into its consumers, and gives the result to the forward
convolution and, as the saved residual, to XLA's own input- and weight-gradient convolutions (only where the
convolution is differentiated; an inference pass gets XLA's convolution unchanged):

    x_m = reshape(x, [-1, C]) @ I_C,   y = conv(x_m, W),   dx, dW = conv_vjp(x_m, W)(dy).

Every element of `x_m` is `1 * x + 0 + ... + 0`, so the values, and therefore the results, equal XLA's
convolution exactly (tests/test_conv.py).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from incremental_jax.registry import Registry

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _xla_conv(x, kernel, strides, padding, dimension_numbers, precision):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=dimension_numbers,
                                  precision=precision)


def materialize(x: jax.Array) -> jax.Array:
  """`x` unchanged in value, computed as `reshape(x, [-1, C]) @ I_C` ([..., C] arrays): a matrix product is
  never fused into the operations that read its result, so XLA stores this array once instead of recomputing
  its elementwise producers inside every consumer."""
  c = x.shape[-1]
  return (x.reshape(-1, c) @ jnp.eye(c, dtype=x.dtype)).reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _materialized_conv(x, kernel, strides, padding, dimension_numbers, precision):
  # Undifferentiated (the frozen teacher, evaluation, herding): nothing transposes the input, so XLA's plain
  # convolution; with the product, XLA:CPU fused a whole inference block into one slow YNNPACK call (34 ms of the
  # LUCIR step for the teacher's last block; the step went from 1072 to 993 ms without it).
  return _xla_conv(x, kernel, strides, padding, dimension_numbers, precision)


def _materialized_conv_fwd(x, kernel, strides, padding, dimension_numbers, precision):
  x = materialize(x)
  return _xla_conv(x, kernel, strides, padding, dimension_numbers, precision), (x, kernel)


def _materialized_conv_bwd(strides, padding, dimension_numbers, precision, residuals, dy):
  x, kernel = residuals
  _, vjp = jax.vjp(lambda v, k: _xla_conv(v, k, strides, padding, dimension_numbers, precision), x, kernel)
  return vjp(dy)


_materialized_conv.defvjp(_materialized_conv_fwd, _materialized_conv_bwd)


def materialized_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                      feature_group_count=1, batch_group_count=1, precision=None, preferred_element_type=None,
                      out_sharding=None, min_size: int = 0):
  """Drop-in for `lax.conv_general_dilated` (what `nnx.Conv` calls): undilated, ungrouped NHWC convolutions with
  explicit padding whose input has at least `min_size` elements read a materialised input (module docstring);
  every other convolution is passed to XLA unchanged."""
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  plain = (not _dilated(lhs_dilation) and not _dilated(rhs_dilation)
           and feature_group_count == 1 and batch_group_count == 1 and preferred_element_type is None
           and out_sharding is None and not isinstance(padding, str) and lhs.size >= min_size
           and dn == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                    feature_group_count, batch_group_count, precision, preferred_element_type,
                                    out_sharding=out_sharding)
  return _materialized_conv(lhs, rhs, tuple(int(v) for v in window_strides),
                            tuple(tuple(int(v) for v in p) for p in padding), _NHWC, precision)


def _dilated(d) -> bool:
  return d is not None and any(int(v) != 1 for v in d)


# The extra matrix product costs more than it saves on small inputs: 'materialized_large' materialises inputs of at
# least 2^18 elements (1 MiB in float32; CIFAR ResNet-32 at batch 128 has 0.5 to 2 M per convolution, the digits
# preset 32 K).
LARGE = 2**18

LOWERINGS: Registry[Callable] = Registry('a conv lowering', {
    'xla': lax.conv_general_dilated, 'materialized': materialized_conv,
    'materialized_large': functools.partial(materialized_conv, min_size=LARGE)})
