"""PODNet: the six POD poolings and POD-spatial, the local similarity classifier, both NCA forms (each against a
NumPy reference written here), k-means proxy imprinting, the method's phases, and end to end on digits."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import podnet as podnet_config
from incremental_jax.losses.podnet import (POOLINGS, adaptive_factor, nca, nca_official, perceptual_features,
                                           pod_pool, pod_spatial)
from incremental_jax.methods import build_method
from incremental_jax.methods.podnet import imprinted_proxies
from incremental_jax.models.lsc import LocalSimilarityHead

RNG = np.random.default_rng(0)


# ---- NumPy references (NCHW, as the official code) ----------------------------------------------------
def ref_pool(h_nchw, pooling):
  """The paper's pooled vectors of an NCHW map (already squared)."""
  b, c, hh, ww = h_nchw.shape
  if pooling == 'pod_pixel':
    return h_nchw.reshape(b, -1)
  if pooling == 'channel':
    return h_nchw.sum(1).reshape(b, -1)
  if pooling == 'gap':
    return h_nchw.mean((2, 3))
  if pooling == 'width':
    return h_nchw.sum(2).reshape(b, -1)
  if pooling == 'height':
    return h_nchw.sum(3).reshape(b, -1)
  return np.concatenate([h_nchw.sum(3).reshape(b, -1), h_nchw.sum(2).reshape(b, -1)], 1)


def ref_pod(old_maps, new_maps, pooling):
  total = 0.0
  for a, b in zip(old_maps, new_maps):
    a, b = ref_pool(a ** 2, pooling), ref_pool(b ** 2, pooling)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    total += np.linalg.norm(a - b, axis=1).mean()
  return total / len(old_maps)


def ref_nca(s, y, mask, eta, margin, exclude_positive=True, hinge=True):
  out = []
  for i in range(len(y)):
    cols = [c for c in np.flatnonzero(mask) if c != y[i] or not exclude_positive]
    num = eta * (s[i, y[i]] - margin)
    den = np.log(sum(np.exp(eta * (s[i, c] - (margin if c == y[i] else 0.0))) for c in cols))
    v = den - num
    out.append(max(v, 0.0) if hinge else v)
  return np.array(out)


def ref_nca_official(s, y, mask, eta, margin=0.6):
  """The official code step by step: margin off every score, scale, minus the row max, the true class's
  denominator entry replaced by 0."""
  out = []
  cols = np.flatnonzero(mask)
  for i in range(len(y)):
    z = eta * (s[i, cols] - margin)
    z = z - z.max()
    j = int(np.flatnonzero(cols == y[i])[0])
    den = z.copy()
    den[j] = 0.0
    out.append(-(z[j] - np.log(np.exp(den).sum())))
  return np.array(out)


def _nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


@pytest.mark.parametrize('pooling', POOLINGS)
def test_pod_pooling_and_distance_match_numpy(pooling):
  old = [RNG.normal(size=(3, 4, 6, 5)).astype(np.float32), RNG.normal(size=(3, 8, 3, 2)).astype(np.float32)]
  new = [o + 0.3 * RNG.normal(size=o.shape).astype(np.float32) for o in old]
  # the pooled vector itself, up to the order of its entries (NHWC vs NCHW flattening)
  got_vec = np.sort(np.asarray(pod_pool(_nhwc(old[0] ** 2), pooling)), axis=1)
  np.testing.assert_allclose(got_vec, np.sort(ref_pool(old[0] ** 2, pooling), axis=1), rtol=1e-5, atol=1e-5)
  got = float(pod_spatial([_nhwc(o) for o in old], [_nhwc(n) for n in new], pooling))
  np.testing.assert_allclose(got, ref_pod(old, new, pooling), rtol=1e-5)
  assert float(pod_spatial([_nhwc(o) for o in old], [_nhwc(o) for o in old], pooling)) < 1e-5


def test_pod_over_the_four_rebuffi_maps_matches_numpy():
  # The official network's four maps (CIFAR shapes at width 2, NCHW): each level weighs 1/4.
  shapes = [(3, 2, 32, 32), (3, 4, 16, 16), (3, 8, 8, 8), (3, 8, 8, 8)]
  old = [RNG.normal(size=s).astype(np.float32) for s in shapes]
  new = [o + 0.5 * RNG.normal(size=o.shape).astype(np.float32) for o in old]
  want = 0.0
  for a, b in zip(old, new):   # the official `pod(..., collapse_channels='spatial')`, written out
    a, b = a ** 2, b ** 2
    a = np.concatenate([a.sum(3).reshape(3, -1), a.sum(2).reshape(3, -1)], 1)
    b = np.concatenate([b.sum(3).reshape(3, -1), b.sum(2).reshape(3, -1)], 1)
    a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    want += np.sqrt(((a - b) ** 2).sum(1)).mean() / 4
  got = float(pod_spatial([_nhwc(o) for o in old], [_nhwc(n) for n in new], 'spatial'))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_pixel_ablation_is_the_official_perceptual_features_form():
  shapes = [(3, 2, 6, 6), (3, 4, 3, 3)]
  old = [RNG.normal(size=s).astype(np.float32) for s in shapes]
  new = [o + 0.5 * RNG.normal(size=o.shape).astype(np.float32) for o in old]
  want = 0.0
  for a, b in zip(old, new):   # perceptual_features_reconstruction: no squaring, squared distance over c*h*w
    a, b = a.reshape(3, -1), b.reshape(3, -1)
    a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    want += (((a - b + 1e-6) ** 2).sum(1) / a.shape[1]).mean()
  want = 2.0 * want / len(shapes)   # factor 2 (the official ablation's), mean over the maps
  got = float(perceptual_features([_nhwc(o) for o in old], [_nhwc(n) for n in new], factor=2.0))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  pod = float(pod_spatial([_nhwc(o) for o in old], [_nhwc(n) for n in new], 'pod_pixel'))
  assert pod > 10 * got   # POD without pooling is a different (much larger) quantity


def test_pod_spatial_gradient_reaches_only_the_new_maps():
  old = [_nhwc(RNG.normal(size=(2, 4, 4, 4)).astype(np.float32))]
  new = [old[0] * 1.5 + 0.1]
  g_old, g_new = jax.grad(lambda o, n: pod_spatial(o, n), argnums=(0, 1))(old, new)
  assert float(jnp.abs(g_old[0]).max()) == 0.0
  assert float(jnp.abs(g_new[0]).max()) > 0.0


def test_adaptive_factor_is_sqrt_seen_over_new():
  seen, new = jnp.asarray([1.0] * 60 + [0.0] * 40), jnp.asarray([0.0] * 50 + [1.0] * 10 + [0.0] * 40)
  assert float(adaptive_factor(3.0, seen, new)) == pytest.approx(3.0 * np.sqrt(6.0))


def test_lsc_scores_match_numpy():
  d, c, k = 6, 4, 3
  head = LocalSimilarityHead(d, c, proxies_per_class=k, rngs=nnx.Rngs(0))
  x = RNG.normal(size=(5, d)).astype(np.float32)
  out = head(jnp.asarray(x))
  w = np.asarray(head.kernel[...])
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  wn = w / np.linalg.norm(w, axis=0, keepdims=True)
  sims = -((xn[:, :, None, None] - wn[None]) ** 2).sum(1)                     # [B, C, K]
  att = np.exp(sims) / np.exp(sims).sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(out['proxy_logits']), sims, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out['logits']), (att * sims).sum(-1), atol=1e-5)
  assert float(out['eta']) == 1.0 and head.class_axes == {'kernel': 1}


@pytest.mark.parametrize('exclude_positive,hinge', [(True, True), (True, False), (False, True)])
def test_nca_matches_numpy_and_has_finite_gradient(exclude_positive, hinge):
  s = -RNG.uniform(0, 4, size=(7, 6)).astype(np.float32)
  y = np.array([0, 1, 2, 3, 4, 0, 2])
  mask = np.array([1, 1, 1, 1, 1, 0], np.float32)
  got = nca(jnp.asarray(s), jnp.asarray(y), jnp.asarray(mask), 1.7, 0.6, exclude_positive, hinge)
  np.testing.assert_allclose(np.asarray(got), ref_nca(s, y, mask, 1.7, 0.6, exclude_positive, hinge), rtol=1e-5,
                             atol=1e-5)
  g = jax.grad(lambda z, e: nca(z, jnp.asarray(y), jnp.asarray(mask), e, 0.6, exclude_positive, hinge).sum(),
               argnums=(0, 1))(jnp.asarray(s), 1.7)
  assert np.isfinite(np.asarray(g[0])).all() and np.isfinite(float(g[1]))
  assert np.all(np.asarray(g[0])[:, 5] == 0)          # unseen class: no gradient


def test_nca_hinge_clips_easy_examples_to_zero():
  s = jnp.asarray([[0.0, -4.0, -4.0]])
  assert float(nca(s, jnp.asarray([0]), jnp.ones(3), 1.0, 0.6)[0]) == 0.0
  assert float(nca(s, jnp.asarray([0]), jnp.ones(3), 1.0, 0.6, hinge=False)[0]) < 0.0


def test_official_nca_matches_the_official_computation_and_ignores_the_margin():
  s = -RNG.uniform(0, 4, size=(6, 5)).astype(np.float32)
  y = np.array([0, 1, 2, 3, 4, 1])
  mask = np.ones(5, np.float32)
  got = np.asarray(nca_official(jnp.asarray(s), jnp.asarray(y), jnp.asarray(mask), 2.0))
  for margin in (0.0, 0.6, 2.0):
    np.testing.assert_allclose(got, ref_nca_official(s, y, mask, 2.0, margin), rtol=1e-5, atol=1e-5)
  assert (got >= -1e-6).all()


def test_imprinted_proxies_are_scaled_kmeans_centres_of_the_new_classes():
  d, c, k = 4, 3, 2
  kernel = RNG.normal(size=(d, c, k)).astype(np.float32)
  # class 2: two tight clusters around two directions
  a, b = np.eye(d)[0], np.eye(d)[1]
  feats = np.concatenate([a + 0.01 * RNG.normal(size=(20, d)), 3 * b + 0.01 * RNG.normal(size=(20, d))])
  labels = np.full(40, 2)
  out = imprinted_proxies(kernel, feats, labels, np.array([2]), np.array([0, 1]))
  np.testing.assert_array_equal(out[:, :2], kernel[:, :2])                      # old classes untouched
  avg_norm = np.linalg.norm(kernel[:, :2].astype(np.float64), axis=0).mean()
  got = sorted(map(tuple, np.round(out[:, 2].T / avg_norm, 1)))
  assert got == sorted([tuple(np.round(b, 1)), tuple(np.round(a, 1))])          # normalised centres, scaled


def test_method_needs_the_lsc_head_and_keeps_memory_and_the_last_model():
  c = podnet_config.get_config('test')
  method = build_method(c, 10, (8, 8, 1))
  assert method.freeze_old_classes and method.uses_memory and method.teacher == 'last'
  with pytest.raises(Exception, match="model.head='lsc'"):
    c2 = podnet_config.get_config('test')
    c2.model.head = 'cosine'
    build_method(c2, 10, (8, 8, 1))


@pytest.mark.parametrize('bn_train', [True, False])
def test_balanced_finetuning_batchnorm_mode(bn_train):
  """The official finetuning loop leaves the network in training mode (`inclearn/models/podnet.py::_train_task`,
  `inclearn/lib/utils.py::extract_features` restores it): the NCA loss sees batch-normalised features and the
  running statistics move, while the backbone's parameters stay fixed; `finetune_bn_train=False` is inference
  mode."""
  from types import SimpleNamespace
  from incremental_jax import parallel, step as step_lib
  from incremental_jax.data import augment
  from incremental_jax.data.scenario import Scenario
  from incremental_jax.memory import Memory
  config = podnet_config.get_config('test')
  config.method.finetune_bn_train = bn_train
  method = build_method(config, 6, (8, 8, 1))
  model = method.model
  scenario = Scenario(np.arange(6), (4, 2))
  ctx = SimpleNamespace(task=1, config=config, memory=Memory({c: np.array([c]) for c in range(6)}), scenario=scenario)
  (phase,) = method.balancing_phases(ctx)
  assert not phase.train_backbone and not phase.use_teacher
  aug = augment.make_augment_fn(config.data.augment, (0.5,), (0.25,))
  state = step_lib.init_train_state(model, parallel.make_mesh(), step_lib.make_optimizer(phase.optim))
  task = step_lib.make_task_info(scenario, 1, phase.trainable_classes).replace(lr=jnp.float32(0.05))
  rng = np.random.default_rng(3)
  batch = {'image': jnp.asarray(rng.integers(0, 255, (8, 8, 8, 1)), jnp.uint8),
           'label': jnp.array([0, 1, 2, 3, 4, 5, 4, 5])}
  after, metrics = jax.jit(method.make_train_step(model, phase, aug, has_teacher=False))(state, None, task, batch)
  x = step_lib.augmented_batch(aug, task, state, batch['image'])
  loss_in = lambda train: float(method.classification_loss(
      model.apply(state.params, state.batch_stats, x, train=train)[0], batch, task, None, None)[0])
  assert float(metrics['loss']) == pytest.approx(loss_in(bn_train), rel=1e-5)
  assert float(metrics['loss']) != pytest.approx(loss_in(not bn_train), rel=1e-3)
  stats0, stats1 = jax.device_get((state.batch_stats, after.batch_stats))
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stats0), jax.tree.leaves(stats1))]
  assert all(moved) if bn_train else not any(moved)
  p0, p1 = jax.device_get((state.params, after.params))
  for a, b in zip(jax.tree.leaves(p0['backbone']), jax.tree.leaves(p1['backbone'])):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(p0['head']['kernel'], p1['head']['kernel'])
  np.testing.assert_array_equal(p0['head']['eta'], p1['head']['eta'])


@pytest.mark.slow
def test_podnet_beats_finetune_on_digits(digits_run):
  podnet = digits_run('podnet')
  finetune = digits_run('finetune')
  assert podnet['avg_incremental_accuracy']['cnn'] >= finetune['avg_incremental_accuracy']['cnn'] + 15
  assert podnet['avg_incremental_accuracy']['nme'] >= finetune['avg_incremental_accuracy']['cnn'] + 15
