"""The hand-differentiated BatchNorm (+ residual, + ReLU) of models/batch_norm.py against autodiff of the plain
formula and against flax's own BatchNorm (forward values, running statistics, whole-network gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from incremental_jax.models import batch_norm as bn_lib
from incremental_jax.models import resnet


def _inputs(shape=(6, 5, 5, 4), seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(k[0], shape) * 2.0 + 0.5
  return (x, jax.random.normal(k[1], shape), jax.random.normal(k[2], shape[-1:]),
          jax.random.normal(k[3], shape[-1:]), jax.random.normal(k[4], shape))


@pytest.mark.parametrize('with_residual', [False, True])
@pytest.mark.parametrize('relu', [False, True])
def test_fused_gradients_equal_autodiff_of_the_formula(with_residual, relu):
  x, res, scale, bias, cotangent = _inputs()
  res = res if with_residual else None

  def grads(fn):
    def loss(x, scale, bias, res):
      return jnp.sum(fn(x, scale, bias, 1e-5, res, relu)[0] * cotangent)
    return jax.grad(loss, argnums=(0, 1, 2, 3) if with_residual else (0, 1, 2))(x, scale, bias, res)

  for got, want in zip(grads(bn_lib.fused_batch_norm), grads(bn_lib.reference_batch_norm)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  out, mean, var = bn_lib.fused_batch_norm(x, scale, bias, 1e-5, res, relu)
  ref = np.asarray(x, np.float64)
  ref = (ref - ref.mean((0, 1, 2))) / np.sqrt(ref.var((0, 1, 2)) + 1e-5) * np.asarray(scale) + np.asarray(bias)
  ref = ref if res is None else ref + np.asarray(res)
  np.testing.assert_allclose(out, np.maximum(ref, 0) if relu else ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mean, np.asarray(x).mean((0, 1, 2)), rtol=1e-5, atol=1e-6)


def test_module_matches_flax_batchnorm_in_both_modes():
  x, res, _, _, _ = _inputs(seed=1)
  ours = bn_lib.BatchNorm(4, momentum=0.9, epsilon=1e-5, impl='fused', rngs=nnx.Rngs(0))
  theirs = nnx.BatchNorm(4, momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
  for m in (ours, theirs):
    m.scale[...] = jnp.arange(1.0, 5.0)
    m.bias[...] = jnp.arange(4.0) - 1.5
  got = ours(x, use_running_average=False, residual=res, relu=True)
  want = jax.nn.relu(theirs(x, use_running_average=False) + res)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ours.mean[...], theirs.mean[...], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(ours.var[...], theirs.var[...], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(ours(x, use_running_average=True), theirs(x, use_running_average=True), rtol=1e-6)
  assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(theirs))   # same checkpoint tree


def test_unknown_impl_is_a_config_error():
  from incremental_jax.errors import ConfigError
  with pytest.raises(ConfigError, match='bn_impl'):
    bn_lib.BatchNorm(4, impl='cudnn', rngs=nnx.Rngs(0))


def _network_loss_and_grads(bn_impl, block='basic'):
  if block == 'basic':
    model = resnet.cifar_resnet(3, depth=8, width=4, layers=resnet.Layers(bn_impl=bn_impl), last_relu=False,
                                rngs=nnx.Rngs(0))
  else:
    model = resnet.ResNet(3, (2, 4), (1, 1), block='bottleneck', layers=resnet.Layers(bn_impl=bn_impl),
                          rngs=nnx.Rngs(0))
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  x = jax.random.normal(jax.random.key(3), (4, 8, 8, 3))

  def loss(params):
    m = nnx.merge(graphdef, params, stats, copy=True)
    out = m(x, train=True)
    value = jnp.sum(out['embedding'] ** 2) + sum(jnp.sum(jnp.sin(s)) for s in out['stages'])
    return value, nnx.state(m, nnx.BatchStat)

  (value, new_stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return value, new_stats, grads


@pytest.mark.parametrize('block', ['basic', 'bottleneck'])
def test_resnet_gradients_equal_flax_batchnorm(block):
  v_fused, s_fused, g_fused = _network_loss_and_grads('fused', block)
  v_flax, s_flax, g_flax = _network_loss_and_grads('flax', block)
  np.testing.assert_allclose(v_fused, v_flax, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s_fused), jax.tree.leaves(s_flax)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_flax)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
