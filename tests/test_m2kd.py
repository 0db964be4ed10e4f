"""M2KD: pruning storage, multi-model distillation (right snapshot per class group), vmapped stacked snapshots,
auxiliary feature distillation, and the digits comparison with LwF and finetune."""
import dataclasses
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import m2kd as m2kd_cfg
from incremental_jax import checkpoint as ckpt_lib
from incremental_jax import pruning
from incremental_jax.data.scenario import make_scenario
from incremental_jax.losses import m2kd as L
from incremental_jax.losses.auxiliary import AUX_LOSSES
from incremental_jax.methods import build_method
from incremental_jax.methods import m2kd as m2kd_lib

NUM_CLASSES, IMAGE_SHAPE = 10, (8, 8, 1)


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl_on(t, s, temperature, mask):
  """NumPy KL(softmax(t/T) || softmax(s/T)) [B] over the classes where mask > 0."""
  idx = np.flatnonzero(mask)
  lt, ls = _log_softmax(t[:, idx] / temperature), _log_softmax(s[:, idx] / temperature)
  return (np.exp(lt) * (lt - ls)).sum(-1)


# ---- pruning -------------------------------------------------------------------------------------------
@pytest.mark.parametrize('shape', [(7,), (3, 3, 4, 5), (16, 10), (1, 1)])
@pytest.mark.parametrize('keep', [0.1, 0.3, 0.5, 1.0])
def test_pruning_keeps_the_fraction_of_largest_weights_and_reconstructs_exactly(shape, keep):
  w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  n = w.size
  mask = pruning.magnitude_mask(w, keep)
  k = max(1, math.ceil(keep * n - 1e-9))
  assert mask.shape == w.shape and mask.sum() == k
  if k < n:
    assert np.abs(w[mask]).min() > np.abs(w[~mask]).max()  # the largest magnitudes
  stored = pruning.compress(w, keep)
  assert stored['values'].shape == (k,) and stored['bits'].dtype == np.uint8
  rebuilt = np.asarray(jax.jit(pruning.decompress, static_argnums=1)(stored, shape))
  np.testing.assert_array_equal(rebuilt, np.where(mask, w, 0.0))  # bit-exact
  assert pruning.nbytes(stored) == 4 * k + math.ceil(n / 8)


def test_pruning_ties_and_bad_ratios():
  w = np.array([1.0, -2.0, 2.0, 0.5, -2.0], np.float32)
  np.testing.assert_array_equal(pruning.magnitude_mask(w, 0.4), [False, True, True, False, False])  # first wins
  for bad in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match='keep ratio'):
      pruning.num_kept(10, bad)


def _model_and_params(seed=0):
  cfg = m2kd_cfg.get_config('test')
  method = build_method(cfg, NUM_CLASSES, IMAGE_SHAPE)
  model = method.model
  params, stats = model.init_variables()
  cfg.method.prune_finetune_epochs = 0  # no data in these tests
  method = build_method(cfg, NUM_CLASSES, IMAGE_SHAPE)
  rng = np.random.default_rng(seed)
  # random, non-trivial batch statistics, so that inference mode is not the identity
  stats = jax.tree.map(lambda s: np.asarray(s) + rng.uniform(0.1, 0.5, np.shape(s)).astype(np.float32), stats)
  return cfg, method, model, jax.tree.map(np.asarray, params), stats


def test_stored_tree_shrinks_to_the_keep_ratio_and_rebuilds_the_masked_model():
  _, _, model, params, _ = _model_and_params()
  dense = pruning.nbytes(params)
  for keep in (0.25, 0.5):
    stored = pruning.compress_tree(params, keep)
    expected = 0
    for leaf in jax.tree.leaves(params):
      n = leaf.size
      expected += 4 * math.ceil(keep * n - 1e-9) + math.ceil(n / 8) if leaf.ndim >= 2 else leaf.nbytes
    assert pruning.nbytes(stored) == expected
    weights = [w for w in jax.tree.leaves(params) if w.ndim >= 2]
    weight_bytes = sum(w.nbytes for w in weights)
    # the weights shrink to the keep ratio plus one bit per weight (and rounding); vectors stay dense
    assert pruning.nbytes(stored) - (dense - weight_bytes) <= (keep + 1 / 32) * weight_bytes + 5 * len(weights)
    rebuilt = pruning.decompress_tree(stored, jax.eval_shape(model.init_variables)[0])
    masked = jax.tree.map(lambda w: np.where(pruning.magnitude_mask(w, keep), w, 0) if w.ndim >= 2 else w, params)
    jax.tree.map(np.testing.assert_array_equal, masked, jax.tree.map(np.asarray, rebuilt))
    ckpt_lib._check_str_keys(stored, 'stored')  # checkpointable as it is


# ---- losses --------------------------------------------------------------------------------------------
@pytest.mark.parametrize('domain', ['group', 'seen'])
@pytest.mark.parametrize('reduction', ['sum', 'mean'])
def test_multi_model_kd_matches_numpy(domain, reduction):
  rng = np.random.default_rng(1)
  s_count, b, t = 3, 4, 2.0
  student = rng.normal(size=(b, NUM_CLASSES)).astype(np.float32) * 2
  snaps = rng.normal(size=(s_count, b, NUM_CLASSES)).astype(np.float32) * 2
  groups = np.zeros((s_count, NUM_CLASSES), np.float32)
  for j, (lo, hi) in enumerate([(0, 4), (4, 6), (6, 8)]):
    groups[j, lo:hi] = 1
  got = L.multi_model_kd(jnp.asarray(student), jnp.asarray(snaps), jnp.asarray(groups), t, domain, reduction)
  terms = []
  for j in range(s_count):
    mask = groups[j] if domain == 'group' else groups[:j + 1].sum(0)
    terms.append(t * t * _kl_on(snaps[j], student, t, mask))
  ref = np.sum(terms, 0) if reduction == 'sum' else np.mean(terms, 0)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('domain', ['group', 'seen'])
@pytest.mark.parametrize('reduction', ['sum', 'mean'])
def test_empty_snapshot_slots_change_neither_the_loss_nor_its_gradient(domain, reduction):
  rng = np.random.default_rng(5)
  b, t = 4, 2.0
  student = jnp.asarray(rng.normal(size=(b, NUM_CLASSES)).astype(np.float32) * 2)
  snaps = rng.normal(size=(2, b, NUM_CLASSES)).astype(np.float32) * 2
  groups = np.zeros((2, NUM_CLASSES), np.float32)
  groups[0, :4], groups[1, 4:7] = 1, 1
  padded_snaps = np.concatenate([snaps, np.zeros((2, b, NUM_CLASSES), np.float32)])
  padded_groups = np.concatenate([groups, np.zeros((2, NUM_CLASSES), np.float32)])
  valid = jnp.asarray([1.0, 1.0, 0.0, 0.0])
  ref = lambda z: L.multi_model_kd(z, jnp.asarray(snaps), jnp.asarray(groups), t, domain, reduction).sum()
  got = lambda z: L.multi_model_kd(z, jnp.asarray(padded_snaps), jnp.asarray(padded_groups), t, domain, reduction,
                                   valid).sum()
  np.testing.assert_allclose(got(student), ref(student), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(got)(student), jax.grad(ref)(student), rtol=1e-6, atol=1e-7)


def test_feature_distillation_matches_numpy_and_is_an_aux_term():
  rng = np.random.default_rng(2)
  student = tuple(rng.normal(size=(3, h, h, c)).astype(np.float32) for h, c in ((4, 2), (2, 5)))
  teacher = tuple(rng.normal(size=x.shape).astype(np.float32) for x in student)

  def dist(a, b):
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    return ((a - b) ** 2).sum(1)

  np.testing.assert_allclose(L.feature_distillation(student, teacher), (dist(student[0], teacher[0]) + dist(student[1], teacher[1])) / 2, rtol=1e-5)
  np.testing.assert_allclose(L.feature_distillation(student, teacher, (1,)), dist(student[1], teacher[1]), rtol=1e-5)
  np.testing.assert_allclose(L.feature_distillation(student, tuple(3 * x for x in student)), 0.0, atol=1e-6)  # scale-free
  term = AUX_LOSSES['feature_kd']
  assert float(term({'stages': student}, {}, None, {'stages': teacher}, {}, stages=(0,))) == pytest.approx(dist(student[0], teacher[0]).mean(), rel=1e-5)
  assert float(term({'stages': student}, {}, None, None, {})) == 0.0


# ---- snapshots -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Context:
  """The `TaskContext` fields `after_task` reads (replaced with `dataclasses.replace`)."""
  config: object
  task: int
  scenario: object
  state: object
  frozen: object
  method_state: dict
  store: object = None
  mesh: object = None

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)


def _store_all(method, cfg, snapshot_params, stats):
  """Runs `after_task` once per task, with `snapshot_params[j]` as the model trained on task j."""
  frozen, method_state = None, {}
  for j, p in enumerate(snapshot_params):
    ctx = method.after_task(_Context(cfg, j, make_scenario(NUM_CLASSES, cfg.data),
                                     types.SimpleNamespace(params=p, batch_stats=stats), frozen, method_state))
    frozen, method_state = ctx.frozen, ctx.method_state
  return frozen, method_state


def test_each_class_group_is_distilled_from_the_snapshot_that_learned_it():
  """Snapshot j outputs the constant logits b_j (zero head kernel, bias b_j). A student equal to b_j on the
  classes of task j, for every j, has zero multi-model loss; a student equal to the last snapshot everywhere
  (sequential distillation's target) has the loss of the NumPy reference with each group's own b_j."""
  cfg, _, model, params, stats = _model_and_params()
  cfg.method.aux_losses = {}  # the multi-model term alone
  method = build_method(cfg, NUM_CLASSES, IMAGE_SHAPE)
  scenario = make_scenario(NUM_CLASSES, cfg.data)  # test preset: tasks of 4, 3, 3 classes
  rng = np.random.default_rng(3)
  biases = [rng.normal(size=NUM_CLASSES).astype(np.float32) * 3 for _ in range(scenario.num_tasks - 1)]
  snaps = []
  for b in biases:
    p = jax.tree.map(np.copy, params)
    p['head']['kernel'] = np.zeros_like(p['head']['kernel'])
    p['head']['bias'] = b
    snaps.append(p)
  frozen, method_state = _store_all(method, cfg, snaps, stats)
  # a fixed stack of one slot per task (the step compiles once per run), the stored ones marked valid
  assert frozen['groups'].shape == (scenario.num_tasks, NUM_CLASSES) == (3, NUM_CLASSES)
  np.testing.assert_array_equal(frozen['valid'], [1, 1, 0])
  np.testing.assert_array_equal(frozen['groups'], [scenario.class_masks(0)['new'], scenario.class_masks(1)['new'],
                                                   np.zeros(NUM_CLASSES)])
  ckpt_lib._check_str_keys({'frozen': frozen, 'method_state': method_state}, 'checkpoint')

  images = jnp.asarray(rng.normal(size=(5,) + IMAGE_SHAPE), jnp.float32)
  teacher = jax.jit(lambda f, x: method.teacher_forward(model, f, x))(frozen, images)
  np.testing.assert_allclose(teacher['snapshot_logits'][:2], np.broadcast_to(np.stack(biases)[:, None], (2, 5, NUM_CLASSES)), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(teacher['snapshot_logits'][2], 0)   # the empty slot is not evaluated
  np.testing.assert_allclose(teacher['logits'], np.broadcast_to(biases[-1], (5, NUM_CLASSES)), rtol=1e-6, atol=1e-6)

  task = types.SimpleNamespace(**{k: jnp.asarray(v) for k, v in scenario.class_masks(2).items()})
  labels = jnp.asarray([7, 8, 9, 7, 8])
  stitched = np.where(scenario.class_masks(0)['new'] > 0, biases[0], biases[1]).astype(np.float32)
  loss = jax.jit(lambda z, t: method.loss({'logits': z}, {'label': labels}, task, t, {})[1])
  right = loss(jnp.broadcast_to(stitched, (5, NUM_CLASSES)), teacher)
  assert float(right['mm_kd']) == pytest.approx(0.0, abs=1e-6)
  last = loss(jnp.broadcast_to(biases[-1], (5, NUM_CLASSES)), teacher)
  t = float(cfg.method.kd_temperature)
  ref = t * t * _kl_on(biases[0][None], biases[1][None], t, scenario.class_masks(0)['new'])[0]
  assert ref > 0.05 and float(last['mm_kd']) == pytest.approx(ref, rel=1e-5)


def test_stacked_snapshots_equal_a_loop_over_the_masked_models():
  cfg, method, model, params, stats = _model_and_params()
  cfg.method.prune_keep = 0.5
  method = build_method(cfg, NUM_CLASSES, IMAGE_SHAPE)
  rng = np.random.default_rng(4)
  snaps = [jax.tree.map(lambda w: w * rng.uniform(0.5, 1.5, w.shape).astype(np.float32), params) for _ in range(3)]
  stored = [{'params': pruning.compress_tree(p, 0.5), 'batch_stats': stats} for p in snaps]
  stacked = pruning.stack(stored)
  images = jnp.asarray(rng.normal(size=(4,) + IMAGE_SHAPE), jnp.float32)
  out = jax.jit(lambda s, x: m2kd_lib.stacked_forward(model, s, x, jnp.ones(len(snaps))))(stacked, images)
  apply = jax.jit(lambda p, s, x: model.apply(p, s, x, train=False)[0])
  for j, p in enumerate(snaps):
    masked = jax.tree.map(lambda w: np.where(pruning.magnitude_mask(w, 0.5), w, 0) if w.ndim >= 2 else w, p)
    ref = apply(masked, stats, images)
    np.testing.assert_allclose(out['logits'][j], ref['logits'], rtol=1e-5, atol=1e-5)
    for s_out, s_ref in zip(out['stages'], ref['stages']):
      np.testing.assert_allclose(s_out[j], s_ref, rtol=1e-5, atol=1e-5)
  dense_logits = apply(snaps[0], stats, images)['logits']
  assert not np.allclose(out['logits'][0], dense_logits, atol=1e-3)  # pruning did change the model


def test_last_teacher_mode_keeps_only_the_previous_snapshot_on_every_old_class():
  cfg, _, model, params, stats = _model_and_params()
  cfg.method.teachers = 'last'
  method = build_method(cfg, NUM_CLASSES, IMAGE_SHAPE)
  frozen, method_state = _store_all(method, cfg, [params, params], stats)
  scenario = make_scenario(NUM_CLASSES, cfg.data)
  assert jax.tree.leaves(frozen['snapshots'])[0].shape[0] == 1
  np.testing.assert_array_equal(frozen['groups'], scenario.class_masks(1)['seen'][None])
  assert method_state['snapshot_bytes'].shape == (1, 2)


# ---- end to end on digits ------------------------------------------------------------------------------
@pytest.mark.slow
def test_m2kd_exemplar_free_on_digits_keeps_far_more_than_finetune(digits_run):
  """Exemplar-free digits (5 tasks of 2 classes). M2KD does NOT beat LwF here (measured: M2KD 79.9, LwF 81.5,
  sequential distillation from the last pruned snapshot 81.9 average incremental accuracy), so that comparison is
  not asserted (and LwF's run is left out to keep this module fast); finetune's run is shared with other modules."""
  m2kd = digits_run('m2kd')
  finetune = digits_run('finetune')
  acc = {'m2kd': m2kd['avg_incremental_accuracy']['cnn'], 'finetune': finetune['avg_incremental_accuracy']['cnn']}
  assert acc['m2kd'] > acc['finetune'] + 25, acc
  # the snapshot stack has a fixed size: one step without a teacher (task 0), one with (every later task)
  assert m2kd['compilations'] == 2
  assert m2kd['last_accuracy']['cnn'] > finetune['last_accuracy']['cnn'] + 20, acc
  assert all(s['memory_size'] == 0 for s in m2kd['steps'])  # exemplar-free
