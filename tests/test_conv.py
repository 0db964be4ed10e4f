"""The 'materialized' convolution lowering (`models.conv`) against XLA's convolution and a NumPy weight gradient,
the lowering each backend gets, and the model option `dtype`."""
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from incremental_jax import config as cfglib
from incremental_jax.models import build_model, conv as conv_lib, functional_model, layers_of, resnet
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
def test_materialized_conv_matches_xla_and_numpy(k, stride, pad, shape):
  rng = np.random.default_rng(k + stride)
  x = rng.normal(size=shape).astype(np.float32)
  w = rng.normal(size=(k, k, shape[-1], 4)).astype(np.float32)
  args = ((stride, stride), [(pad, pad)] * 2)
  xla = lambda x, w: lax.conv_general_dilated(x, w, *args, dimension_numbers=DN)
  mat = lambda x, w: conv_lib.materialized_conv(x, w, *args, dimension_numbers=DN)
  y = xla(x, w)
  # The input is the same array (x @ I adds only exact zeros), so the convolution is the same to the bit.
  np.testing.assert_array_equal(mat(x, w), y)
  dy = rng.normal(size=y.shape).astype(np.float32)
  dx_ref, dw_ref = jax.vjp(xla, x, w)[1](dy)
  dx, dw = jax.vjp(mat, x, w)[1](dy)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dw, _numpy_weight_gradient(x, dy, k, stride, pad), rtol=1e-4, atol=1e-4)


def test_materialize_is_exact_and_not_fused_away():
  rng = np.random.default_rng(3)
  x = (rng.normal(size=(2, 3, 3, 5)) * 10.0 ** rng.integers(-30, 30, size=(2, 3, 3, 5))).astype(np.float32)
  np.testing.assert_array_equal(jax.jit(conv_lib.materialize)(x), x)
  # The matrix product survives XLA's optimisations: it is what stops the producers from being fused into
  # (and recomputed by) every consumer.
  relu_of = lambda f: jax.jit(lambda v: jax.nn.relu(f(v * 2.0)) + 1.0).lower(x).compile().as_text()
  assert ' dot(' in relu_of(conv_lib.materialize)
  assert ' dot(' not in relu_of(lambda v: v)


def test_materialized_conv_under_vmap_and_fallback():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 2, 5, 5, 4)).astype(np.float32)     # 3 independent problems
  w = rng.normal(size=(3, 3, 3, 4, 4)).astype(np.float32)
  loss = lambda impl: lambda x, w: (impl(x, w, (1, 1), [(1, 1)] * 2, dimension_numbers=DN) ** 2).sum()
  ref = jax.vmap(jax.grad(loss(lax.conv_general_dilated), argnums=(0, 1)))(x, w)
  got = jax.vmap(jax.grad(loss(conv_lib.materialized_conv), argnums=(0, 1)))(x, w)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # A grouped convolution is not a plain one: it goes to XLA unchanged (same gradient).
  grouped = lambda impl: lambda w: (impl(x[0], w, (1, 1), [(1, 1)] * 2, dimension_numbers=DN,
                                         feature_group_count=2) ** 2).sum()
  wg = w[0][:, :, :2, :]
  np.testing.assert_allclose(jax.grad(grouped(conv_lib.materialized_conv))(wg),
                             jax.grad(grouped(lax.conv_general_dilated))(wg), rtol=1e-5)


def _model(backend=None, **model_fields):
  c = cfglib.test_preset(cfglib.base_config())
  c.model.depth = 8
  for k, v in model_fields.items():
    c.model[k] = v
  if backend is None:
    return build_model(c.model, 5, (8, 8, 1), seed=0)
  layers = layers_of(c.model, backend)
  construct = lambda: resnet.cifar_resnet(1, depth=8, width=4, layers=layers, rngs=nnx.Rngs(0))
  return functional_model(construct, {}, 0, 16)


def _loss_and_grads(model, x, output='logits'):
  params, stats = model.init_variables()

  def loss(p):
    out, _ = model.apply(p, stats, x, train=True)
    return (out[output] ** 2).mean(), out
  (value, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return value, out, grads


def test_each_backend_gets_its_lowering_and_the_materialized_resnet_equals_xla():
  assert layers_of(cfglib.base_config().model, 'cpu').conv_lowering == 'materialized_large'
  assert layers_of(cfglib.base_config().model, 'gpu').conv_lowering == 'xla'
  assert layers_of(cfglib.base_config().model, 'tpu').conv_lowering == 'xla'
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, 8, 1)), jnp.float32)
  at_every_size = conv_lib.LOWERINGS.with_entries(materialized_large=conv_lib.materialized_conv)
  with mock.patch.object(conv_lib, 'LOWERINGS', at_every_size):
    mat = _model('cpu')
    v_mat, _, g_mat = _loss_and_grads(mat, x, 'embedding')
  xla = _model('gpu')
  v_xla, _, g_xla = _loss_and_grads(xla, x, 'embedding')
  assert float(v_mat) == pytest.approx(float(v_xla), rel=1e-6)
  for a, b in zip(jax.tree.leaves(g_mat), jax.tree.leaves(g_xla)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The 'cpu' network's gradient really goes through the identity products, the 'gpu' one's does not.
  hlo = lambda m: jax.jit(jax.grad(lambda p, s: _embedding_loss(m, p, s, x))).lower(
      *m.init_variables()).compile().as_text()
  assert ' dot(' in hlo(mat) and ' dot(' not in hlo(xla)


def _embedding_loss(model, params, stats, x):
  return (model.apply(params, stats, x, train=True)[0]['embedding'] ** 2).mean()


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


def test_bad_compute_dtype_is_refused():
  c = cfglib.test_preset(cfglib.base_config())
  c.model.dtype = 'float16'
  with pytest.raises(ConfigError, match='model.dtype'):
    validate_config(c)


def test_materialized_large_leaves_small_inputs_to_xla():
  """`min_size` (the 'auto' threshold): a differentiated convolution whose input is below it gets XLA's plain
  convolution (no identity product in the compiled gradient), one at or above it the materialised input; an
  undifferentiated one (a frozen teacher, evaluation) never gets the product."""
  x = np.ones((2, 4, 4, 3), np.float32)                           # 96 elements
  w = np.ones((3, 3, 3, 2), np.float32)
  conv = lambda v, k, size: conv_lib.materialized_conv(jax.nn.relu(v), k, (1, 1), [(1, 1)] * 2,
                                                       dimension_numbers=DN, min_size=size)
  grad = lambda size: jax.jit(jax.grad(lambda v, k: jnp.sum(conv(v, k, size) ** 2), argnums=(0, 1))).lower(
      x, w).compile().as_text()
  assert ' dot(' not in grad(97)
  assert ' dot(' in grad(96)
  assert ' dot(' not in jax.jit(lambda v: conv(v, w, 0)).lower(x).compile().as_text()
