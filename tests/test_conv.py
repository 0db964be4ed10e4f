"""The 'taps' convolution lowering (`models.conv`) against XLA's convolution and a NumPy weight gradient, and
the model options `conv_impl` and `dtype`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from incremental_jax import config as cfglib
from incremental_jax.models import build_model, conv as conv_lib
from incremental_jax.validate import ConfigError, validate_config

DN = ('NHWC', 'HWIO', 'NHWC')


def _numpy_weight_gradient(x, dy, k, stride, pad):
  """dW[i, j, c, d] = sum_{b, h, w} x_pad[b, s h + i, s w + j, c] dy[b, h, w, d], by loops over taps."""
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))).astype(np.float64)
  _, ho, wo, _ = dy.shape
  dw = np.zeros((k, k, x.shape[-1], dy.shape[-1]))
  for i in range(k):
    for j in range(k):
      window = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
      dw[i, j] = np.einsum('bhwc,bhwd->cd', window, dy)
  return dw


@pytest.mark.parametrize('k,stride,pad,shape', [(3, 1, 1, (2, 6, 6, 3)), (3, 2, 1, (2, 7, 6, 3)),
                                                (1, 2, 0, (2, 6, 6, 3)), (7, 2, 3, (1, 9, 9, 2))])
def test_taps_conv_matches_xla_and_numpy(k, stride, pad, shape):
  rng = np.random.default_rng(k + stride)
  x = rng.normal(size=shape).astype(np.float32)
  w = rng.normal(size=(k, k, shape[-1], 4)).astype(np.float32)
  args = ((stride, stride), [(pad, pad)] * 2)
  xla = lambda x, w: lax.conv_general_dilated(x, w, *args, dimension_numbers=DN)
  taps = lambda x, w: conv_lib.taps_conv(x, w, *args, dimension_numbers=DN)
  y = xla(x, w)
  np.testing.assert_allclose(taps(x, w), y, rtol=1e-5, atol=1e-5)
  dy = rng.normal(size=y.shape).astype(np.float32)
  dx_ref, dw_ref = jax.vjp(xla, x, w)[1](dy)
  dx, dw = jax.vjp(taps, x, w)[1](dy)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dw, _numpy_weight_gradient(x, dy, k, stride, pad), rtol=1e-4, atol=1e-4)


def test_taps_conv_under_vmap_and_fallback():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 2, 5, 5, 4)).astype(np.float32)     # 3 independent problems
  w = rng.normal(size=(3, 3, 3, 4, 4)).astype(np.float32)
  loss = lambda impl: lambda x, w: (impl(x, w, (1, 1), [(1, 1)] * 2, dimension_numbers=DN) ** 2).sum()
  ref = jax.vmap(jax.grad(loss(lax.conv_general_dilated), argnums=1))(x, w)
  got = jax.vmap(jax.grad(loss(conv_lib.taps_conv), argnums=1))(x, w)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  # A grouped convolution is not a plain one: it goes to XLA unchanged (same gradient).
  grouped = lambda impl: lambda w: (impl(x[0], w, (1, 1), [(1, 1)] * 2, dimension_numbers=DN,
                                         feature_group_count=2) ** 2).sum()
  wg = w[0][:, :, :2, :]
  np.testing.assert_allclose(jax.grad(grouped(conv_lib.taps_conv))(wg), jax.grad(grouped(lax.conv_general_dilated))(wg),
                             rtol=1e-5)


def _model(**model_fields):
  c = cfglib.test_preset(cfglib.base_config())
  c.model.depth = 8
  for k, v in model_fields.items():
    c.model[k] = v
  return build_model(c.model, 5, (8, 8, 1), seed=0)


def _loss_and_grads(model, x):
  params, stats = model.init_variables()

  def loss(p):
    out, _ = model.apply(p, stats, x, train=True)
    return (out['logits'] ** 2).mean(), out
  (value, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return value, out, grads


def test_resnet_taps_equals_xla():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, 8, 1)), jnp.float32)
  v_xla, _, g_xla = _loss_and_grads(_model(conv_impl='xla'), x)
  v_taps, _, g_taps = _loss_and_grads(_model(conv_impl='taps'), x)
  assert float(v_taps) == pytest.approx(float(v_xla), rel=1e-5)
  for a, b in zip(jax.tree.leaves(g_taps), jax.tree.leaves(g_xla)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_bfloat16_compute_keeps_float32_parameters_and_outputs():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 8, 8, 1)), jnp.float32)
  _, out32, _ = _loss_and_grads(_model(dtype='float32'), x)
  _, out16, grads16 = _loss_and_grads(_model(dtype='bfloat16'), x)
  assert {g.dtype for g in jax.tree.leaves(grads16)} == {jnp.dtype(jnp.float32)}
  assert out16['embedding'].dtype == jnp.float32 and all(s.dtype == jnp.float32 for s in out16['stages'])
  # bfloat16 keeps 8 bits of mantissa: the embedding agrees to a few percent, not to float32 rounding.
  err = np.abs(np.asarray(out16['embedding']) - np.asarray(out32['embedding'])).max()
  scale = np.abs(np.asarray(out32['embedding'])).max()
  assert 0 < err < 0.05 * scale


@pytest.mark.parametrize('field,value', [('conv_impl', 'im2col'), ('dtype', 'float16')])
def test_bad_model_options_are_refused(field, value):
  c = cfglib.test_preset(cfglib.base_config())
  c.model[field] = value
  with pytest.raises(ConfigError, match=f'model.{field}'):
    validate_config(c)
