"""LUCIR: cosine head, less-forget constraint, adaptive weight, margin ranking loss, imprinting (each against a
NumPy reference), the class-balanced finetuning phase, presets, and end to end on digits."""
import dataclasses
import importlib.util
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import lucir as lucir_config
from incremental_jax import parallel
from incremental_jax.data.scenario import Scenario
from incremental_jax.losses import cross_entropy, masked_mean
from incremental_jax.losses.lucir import adaptive_lambda, less_forget, margin_ranking
from incremental_jax.memory import Memory
from incremental_jax.methods import build_method
from incremental_jax.methods.base import Phase, TaskContext
from incremental_jax.methods.lucir import imprinted_weights
from incremental_jax.models import HEADS, build_model
from incremental_jax.train import head_update_mask
from incremental_jax.models.cosine import CosineHead
from incremental_jax.train import init_train_state, make_optimizer, make_task_info


def _unit(x, axis=-1):
  return x / np.linalg.norm(x, axis=axis, keepdims=True)


# ---- reference implementations, written from the paper's equations and the official code -------------
def ref_margin_ranking(cos, labels, old, new, k, m):
  """Official MR loss: over old-class samples, hinge(m - cos_gt + cos_hard) for the top-k new-class cosines,
  averaged over all (sample, hard negative) pairs; 0 without old-class samples."""
  new_cols = np.flatnonzero(new)
  terms = []
  for i, y in enumerate(labels):
    if not old[y]:
      continue
    hard = np.sort(cos[i, new_cols])[::-1][:k]
    terms += [max(0.0, m - cos[i, y] + h) for h in hard]
  return float(np.mean(terms)) if terms else 0.0


def test_cosine_head_logits_match_numpy():
  assert HEADS['cosine'] is CosineHead and CosineHead.class_axes == {'kernel': -1}
  head = CosineHead(6, 5, rngs=nnx.Rngs(0), sigma_init=3.0)
  x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
  w = np.asarray(head.kernel[...])
  out = head(jnp.asarray(x))
  cos = _unit(x) @ _unit(w, axis=0)
  np.testing.assert_allclose(out['cosine'], cos, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out['logits'], 3.0 * cos, rtol=1e-5, atol=1e-6)
  assert np.all(np.abs(np.asarray(out['cosine'])) <= 1 + 1e-6)
  # the official initialisation: sigma 1, weights U(-1/sqrt(D), 1/sqrt(D)); the scale is learnable
  default = CosineHead(64, 100, rngs=nnx.Rngs(1))
  assert float(default.sigma[...]) == 1.0 and np.abs(np.asarray(default.kernel[...])).max() <= 1 / 8
  # the logits do not depend on the norms of the features or of the weights
  np.testing.assert_allclose(head(jnp.asarray(7 * x))['logits'], out['logits'], rtol=1e-5, atol=1e-6)


def test_less_forget_matches_numpy_and_stops_the_teacher_gradient():
  rng = np.random.default_rng(1)
  f_new, f_old = rng.normal(size=(2, 5, 8)).astype(np.float32)
  ref = 1 - (_unit(f_new) * _unit(f_old)).sum(-1)
  np.testing.assert_allclose(less_forget(f_new, f_old), ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(less_forget(f_old * 3, f_old), 0.0, atol=1e-6)
  g_old = jax.grad(lambda b: less_forget(jnp.asarray(f_new), b).sum())(jnp.asarray(f_old))
  assert np.all(np.asarray(g_old) == 0)


def test_adaptive_lambda_is_traced_from_the_masks():
  masks = lambda n_old, n_new, c=100: (np.r_[np.ones(n_old), np.zeros(c - n_old)].astype(np.float32),
                                       np.r_[np.zeros(n_old), np.ones(n_new), np.zeros(c - n_old - n_new)].astype(np.float32))
  f = jax.jit(lambda o, n: adaptive_lambda(5.0, o, n))
  for n_old, n_new in ((50, 10), (60, 10), (90, 10), (50, 2), (98, 1)):
    assert float(f(*masks(n_old, n_new))) == pytest.approx(5.0 * np.sqrt(n_old / n_new), rel=1e-6)
  assert f._cache_size() == 1  # one compilation for every task
  assert float(f(*masks(0, 50))) == 0.0


def test_margin_ranking_matches_numpy_reference():
  rng = np.random.default_rng(2)
  c, b = 10, 12
  old = np.r_[np.ones(5), np.zeros(5)].astype(np.float32)
  new = np.r_[np.zeros(5), np.ones(3), np.zeros(2)].astype(np.float32)  # classes 8, 9 are unseen
  labels = rng.integers(0, 8, b).astype(np.int32)
  cos = np.tanh(rng.normal(size=(b, c))).astype(np.float32)
  for k, m in ((2, 0.5), (1, 0.3), (3, 0.5)):
    values, weights = margin_ranking(cos, labels, old, new, k, m)
    np.testing.assert_allclose(float(masked_mean(values, weights)), ref_margin_ranking(cos, labels, old, new, k, m),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(weights, old[labels])


def test_margin_ranking_selects_top_k_new_classes_and_ignores_new_class_samples():
  old = np.array([1, 1, 0, 0, 0, 0], np.float32)
  new = np.array([0, 0, 1, 1, 1, 0], np.float32)
  labels = np.array([0, 1, 3], np.int32)
  cos = np.array([[0.9, 0.1, 0.2, 0.8, 0.5, 1.0],   # gt 0.9; hard new: 0.8, 0.5 (unseen class 5 ignored)
                  [0.3, 0.2, 0.6, -0.4, 0.1, 0.9],  # gt 0.2; hard new: 0.6, 0.1
                  [0.0, 0.0, 0.9, 0.1, 0.8, 0.0]],  # a new-class sample: contributes nothing
                 np.float32)
  values, weights = margin_ranking(cos, labels, old, new, 2, 0.5)
  # hand-computed: sample 0: (0.5-0.9+0.8) + (0.5-0.9+0.5) = 0.4 + 0.1; sample 1: 0.9 + 0.4
  np.testing.assert_allclose(values, [0.25, 0.65, 0.0], rtol=1e-5)
  assert float(masked_mean(values, weights)) == pytest.approx((0.4 + 0.1 + 0.9 + 0.4) / 4, rel=1e-5)
  grad = np.asarray(jax.grad(lambda z: masked_mean(*margin_ranking(z, labels, old, new, 2, 0.5)))(jnp.asarray(cos)))
  # gradient only on the ground-truth cosine and the two selected new classes of old-class samples
  np.testing.assert_allclose(grad[0], [-0.5, 0, 0, 0.25, 0.25, 0], atol=1e-6)
  np.testing.assert_allclose(grad[1], [0, -0.5, 0.25, 0, 0.25, 0], atol=1e-6)
  np.testing.assert_array_equal(grad[2], 0)
  # a batch of new-class samples only gives 0
  only_new = margin_ranking(cos[2:], labels[2:], old, new, 2, 0.5)
  assert float(masked_mean(*only_new)) == 0.0
  # one new class with K = 2: only the existing pair counts (50-step protocol)
  one_new = np.array([0, 0, 1, 0, 0, 0], np.float32)
  np.testing.assert_allclose(margin_ranking(cos, labels, old, one_new, 2, 0.5)[0], [0.0, 0.9, 0.0], atol=1e-6)


def test_imprinted_weights_match_numpy():
  rng = np.random.default_rng(3)
  d, c = 6, 7
  kernel = rng.normal(size=(d, c)).astype(np.float32)
  feats = rng.normal(size=(20, d)).astype(np.float32) + 2.0
  labels = np.repeat([3, 4], 10)
  original = kernel.copy()
  out = imprinted_weights(kernel, feats, labels, np.array([3, 4]), np.array([0, 1, 2]))
  np.testing.assert_array_equal(kernel, original)  # the input is not modified
  mean_norm = np.linalg.norm(kernel[:, :3], axis=0).mean()
  for c_ in (3, 4):
    ref = _unit(_unit(feats[labels == c_]).mean(0)) * mean_norm
    np.testing.assert_allclose(out[:, c_], ref, rtol=1e-5)
  np.testing.assert_array_equal(out[:, [0, 1, 2, 5, 6]], kernel[:, [0, 1, 2, 5, 6]])


def _tiny(preset='test', **method):
  c = lucir_config.get_config(preset)
  for k, v in method.items():
    c.method[k] = v
  return c


def test_before_task_imprints_new_classes_with_the_current_model():
  config = _tiny()
  method = build_method(config, 6, (8, 8, 1))
  model = method.model
  mesh = parallel.make_mesh()
  state = init_train_state(model, mesh, make_optimizer(config.optim))
  rng = np.random.default_rng(4)
  images = rng.integers(0, 255, (30, 8, 8, 1)).astype(np.uint8)
  labels = np.repeat(np.arange(6), 5).astype(np.int32)
  apply = jax.jit(lambda p, s, x: model.apply(p, s, x)[0]['embedding'])
  embed = lambda p, s, idx, flip=False: np.asarray(apply(p, s, jnp.asarray(images[idx], jnp.float32) / 255))
  ctx = TaskContext(config=config, task=1, scenario=Scenario(np.arange(6), (4, 2)), train_images=images,
                    train_labels=labels, model=model, state=state, frozen=None, method_state={}, memory=Memory(),
                    embed=embed, predict=None, mesh=mesh)
  out = method.before_task(ctx)
  k0, k1 = np.asarray(state.params['head']['kernel']), np.asarray(out.state.params['head']['kernel'])
  feats = embed(state.params, state.batch_stats, np.arange(20, 30))
  np.testing.assert_allclose(k1, imprinted_weights(k0, feats, labels[20:], np.array([4, 5]), np.arange(4)), rtol=1e-5,
                             atol=1e-6)
  assert not np.allclose(k1[:, 4:], k0[:, 4:])
  first = method.before_task(dataclasses.replace(ctx, task=0))  # task 0: nothing to imprint
  np.testing.assert_array_equal(np.asarray(first.state.params['head']['kernel']), k0)


def test_method_loss_is_ce_plus_weighted_lc_plus_mr():
  method = build_method(_tiny(), 10, (8, 8, 1))
  rng = np.random.default_rng(5)
  c = 6
  old, new = np.array([1, 1, 1, 1, 0, 0], np.float32), np.array([0, 0, 0, 0, 1, 1], np.float32)
  task = make_task_info(Scenario(np.arange(c), (4, 2)), 1, new)
  labels = np.array([0, 3, 4, 5, 2], np.int32)
  cos = np.tanh(rng.normal(size=(5, c))).astype(np.float32)
  emb, emb_old = rng.normal(size=(2, 5, 8)).astype(np.float32)
  outputs = {'logits': 2.0 * cos, 'cosine': cos, 'embedding': emb}
  total, metrics = method.loss(outputs, {'label': labels}, task, {'embedding': emb_old}, None)
  z = 2.0 * cos[:, :6]
  ce = np.mean(np.log(np.exp(z).sum(-1)) - z[np.arange(5), labels])
  lc = np.mean(1 - (_unit(emb) * _unit(emb_old)).sum(-1))
  mr = ref_margin_ranking(cos, labels, old, new, 2, 0.5)
  assert float(total) == pytest.approx(ce + 5.0 * np.sqrt(4 / 2) * lc + mr, rel=1e-5)
  assert float(metrics['mr']) == pytest.approx(mr, rel=1e-5)
  # first task (no teacher): cross-entropy only
  total0, _ = method.loss(outputs, {'label': labels}, task, None, None)
  assert float(total0) == pytest.approx(float(cross_entropy(z, labels).mean()), rel=1e-5)


def test_balanced_finetuning_phase_trains_the_classifier_only():
  config = _tiny(cb_finetune=True)
  method = build_method(config, 10, (8, 8, 1))
  ctx = SimpleNamespace(task=1, config=config, memory=Memory({0: np.array([1, 2]), 5: np.array([9])}),
                        scenario=Scenario(np.arange(10), (4, 3, 3)))
  (phase,) = method.balancing_phases(ctx)
  assert not phase.train_backbone and phase.frozen_params == ('head/sigma',)
  np.testing.assert_array_equal(phase.indices, [1, 2, 9])
  np.testing.assert_array_equal(phase.trainable_classes, [1] * 7 + [0] * 3)  # old and new classes
  assert phase.optim.epochs == 20 and phase.optim.lr == 0.01 and tuple(phase.optim.milestones) == (10,)
  assert build_method(_tiny(), 10, (8, 8, 1)).balancing_phases(ctx) == []  # off by default, as the paper's main results
  # the trainer's update mask gives sigma (and only sigma in the head) no update
  model = build_model(config.model, 10, (8, 8, 1))
  params, _ = model.init_variables()
  mask = head_update_mask(model, params, jnp.asarray(phase.trainable_classes), backbone=False,
                          frozen=phase.frozen_params)
  assert float(mask['head']['sigma']) == 0.0 and np.asarray(mask['head']['kernel']).ravel().tolist() == [1] * 7 + [0] * 3
  assert float(head_update_mask(model, params, jnp.ones(10))['head']['sigma']) == 1.0


class _FlatBackbone(nnx.Module):
  """A one-layer backbone: the train step compiles in a second (no convolution)."""

  def __init__(self, rngs):
    self.dense = nnx.Linear(64, 5, rngs=rngs)

  def __call__(self, x, train=False):
    e = self.dense(x.reshape(x.shape[0], -1))
    return {'stages': (e,), 'embedding': e}


def test_train_step_updates_sigma_in_the_main_phase_but_not_in_balanced_finetuning():
  from incremental_jax import train
  from incremental_jax.data import augment
  from incremental_jax.models import Classifier, functional_model
  config = _tiny(cb_finetune=True)
  method = build_method(config, 10, (8, 8, 1))
  model = functional_model(lambda: Classifier(_FlatBackbone(nnx.Rngs(0)), CosineHead(5, 6, rngs=nnx.Rngs(1))),
                           CosineHead.class_axes, 6, 5)
  scenario = Scenario(np.arange(6), (4, 2))
  ctx = SimpleNamespace(task=1, config=config, memory=Memory({c: np.array([c]) for c in range(6)}), scenario=scenario)
  rng = np.random.default_rng(6)
  batch = {'image': jnp.asarray(rng.integers(0, 255, (8, 8, 8, 1)), jnp.uint8), 'label': jnp.array([0, 1, 2, 3, 4, 5, 4, 5])}
  aug = augment.make_augment_fn(config.data.augment, (0.5,), (0.25,))
  mesh = parallel.make_mesh()
  main = Phase('train', method.loss, np.arange(8), config.optim)
  (balanced,) = method.balancing_phases(ctx)
  for phase, trainable, is_main in ((main, scenario.class_masks(1)['new'], True),
                                    (balanced, balanced.trainable_classes, False)):
    state = init_train_state(model, mesh, make_optimizer(phase.optim))
    step = jax.jit(train.make_train_step(model, method, phase, aug, has_teacher=False))
    after, _ = step(state, None, make_task_info(scenario, 1, trainable).replace(lr=jnp.float32(0.1)), batch)
    p0, p1 = jax.device_get(state.params), jax.device_get(after.params)
    # sigma learns with the backbone in the main phase; balanced finetuning trains the class weights only
    assert (float(p1['head']['sigma']) != float(p0['head']['sigma'])) == is_main
    assert (not np.allclose(p0['backbone']['dense']['kernel'], p1['backbone']['dense']['kernel'])) == is_main
    moved = ~np.all(np.isclose(p0['head']['kernel'], p1['head']['kernel']), axis=0)
    np.testing.assert_array_equal(moved, np.asarray(trainable) > 0)


def test_presets():
  c = lucir_config.get_config()
  assert (c.data.name, c.data.initial_classes, c.data.increment) == ('cifar100', 50, 5)
  assert c.model.head == 'cosine' and not c.model.last_relu and c.model.shortcut == 'conv' and c.model.depth == 32
  assert (c.optim.epochs, c.optim.lr, tuple(c.optim.milestones), c.optim.batch_size, c.optim.weight_decay) == \
      (160, 0.1, (80, 120), 128, 5e-4)
  assert (c.method.lambda_base, c.method.margin, c.method.num_hard_negatives, c.memory.per_class) == (5.0, 0.5, 2, 20)
  assert c.data.class_order_seed == 1993 and not c.method.cb_finetune
  for name, inc in (('cifar100_b50_s5', 10), ('cifar100_b50_s25', 2), ('cifar100_b50_s50', 1)):
    assert lucir_config.get_config(name).data.increment == inc
  im = lucir_config.get_config('imagenet100_b50_s10')
  assert (im.model.backbone, im.model.depth, im.method.lambda_base, im.model.head) == ('resnet', 18, 10.0, 'cosine')
  assert im.optim.weight_decay == 1e-4 and not im.model.last_relu and not im.memory.nme_flip
  d = lucir_config.get_config('digits')
  assert (d.data.name, d.data.initial_classes, d.data.increment, d.memory.per_class) == ('digits', 2, 2, 5)
  with pytest.raises(ValueError, match="preset='cifar100_b0_s10' is not a preset; valid names"):
    lucir_config.get_config('cifar100_b0_s10')


@pytest.mark.xfail(importlib.util.find_spec('incremental_jax.data.cifar') is None, strict=False,
                   reason='needs incremental_jax.data.cifar')
def test_default_preset_without_cifar_data_says_how_to_prepare_it(tmp_path):
  import incremental_jax
  from incremental_jax.data.sources import DataError
  c = lucir_config.get_config()
  c.data.data_dir = str(tmp_path / 'empty')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DataError, match='digits'):
    incremental_jax.train_and_evaluate(c, str(tmp_path / 'run'))


@pytest.mark.slow
def test_lucir_beats_finetune_on_digits(digits_run):
  lucir = digits_run('lucir')
  finetune = digits_run('finetune')
  acc, ft = lucir['avg_incremental_accuracy'], finetune['avg_incremental_accuracy']['cnn']
  print(f"finetune {ft:.2f}  lucir CNN {acc['cnn']:.2f} NME {acc['nme']:.2f}")
  assert acc['cnn'] >= ft + 15 and acc['nme'] >= ft + 15
  assert lucir['average_forgetting']['cnn'] < finetune['average_forgetting']['cnn'] - 50
  assert lucir['steps'][-1]['memory_size'] == 5 * 10
