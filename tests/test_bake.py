"""BAKE: affinity, closed-form propagation, loss and gradient against NumPy references, the auxiliary-loss
mechanism, the intra-class sampler, global-batch equivalence on 8 simulated devices, and end-to-end digits runs."""
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from incremental_jax.data import pipeline
from incremental_jax.losses import auxiliary
from incremental_jax.losses import bake as bake_lib


# jitted once (eager JAX on CPU is slow); temperature and omega are static
bake_loss = jax.jit(bake_lib.bake_loss, static_argnums=(2, 3))
soft_targets = jax.jit(bake_lib.soft_targets, static_argnums=(2, 3))
batch_affinity = jax.jit(bake_lib.batch_affinity)
propagate = jax.jit(bake_lib.propagate, static_argnums=(2,))


# ---- NumPy references --------------------------------------------------------------------------------------
def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_affinity(f):
  f = f / np.linalg.norm(f, axis=-1, keepdims=True)
  s = f @ f.T
  np.fill_diagonal(s, -np.inf)
  return _softmax(s)


def _np_targets(f, z, T, w):
  a = _np_affinity(f.astype(np.float64))
  return (1 - w) * np.linalg.inv(np.eye(len(f)) - w * a) @ _softmax(z.astype(np.float64) / T)


def _np_bake(q, z, T):
  """Per-example T^2 KL(q || softmax(z/T)) for fixed targets q."""
  log_p = np.log(_softmax(z / T))
  return T ** 2 * (q * (np.log(np.where(q > 0, q, 1.0)) - log_p)).sum(-1)


def _batch(b=12, d=6, c=5, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(b, d)).astype(np.float32), (3 * rng.normal(size=(b, c))).astype(np.float32)


# ---- affinity and propagation ------------------------------------------------------------------------------
def test_affinity_matches_numpy_with_zero_diagonal_and_unit_rows():
  f, _ = _batch()
  a = np.asarray(batch_affinity(f))
  np.testing.assert_allclose(a, _np_affinity(f.astype(np.float64)), rtol=1e-5, atol=1e-7)
  assert np.all(np.diag(a) == 0)
  np.testing.assert_allclose(a.sum(1), 1.0, rtol=1e-6)
  # only directions matter (L2-normalised embeddings), no temperature on the affinity
  np.testing.assert_allclose(batch_affinity(f * np.arange(1, 13, dtype=np.float32)[:, None]), a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('omega', [0.5, 0.9])
def test_closed_form_equals_iterated_propagation_and_numpy(omega):
  f, z = _batch(seed=1)
  T = 4.0
  a = batch_affinity(f)
  p = jax.nn.softmax(jnp.asarray(z) / T, axis=-1)
  q = np.asarray(propagate(a, p, omega))
  # Q_{t+1} = w A Q_t + (1 - w) P, to convergence (contraction with factor w)
  q_it = np.asarray(p, np.float64)
  a64, p64 = np.asarray(a, np.float64), np.asarray(p, np.float64)
  for _ in range(400):
    q_it = omega * a64 @ q_it + (1 - omega) * p64
  np.testing.assert_allclose(q, q_it, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(soft_targets(f, z, T, omega)), _np_targets(f, z, T, omega), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-5)
  assert np.all(q >= 0)
  # the ensemble really mixes in other samples' predictions: Q differs from P
  assert np.abs(q - p64).max() > 1e-2


def test_soft_targets_give_unseen_classes_zero_probability():
  f, z = _batch(seed=2)
  mask = np.array([1, 1, 1, 0, 0], np.float32)
  q = np.asarray(soft_targets(f, z, 4.0, 0.5, mask))
  assert np.all(q[:, 3:] == 0)
  np.testing.assert_allclose(q[:, :3], _np_targets(f, z[:, :3], 4.0, 0.5), rtol=1e-5, atol=1e-6)


# ---- loss and gradient -------------------------------------------------------------------------------------
def test_loss_value_and_gradient_match_numpy_and_finite_differences():
  f, z = _batch(b=8, seed=3)
  T, w = 4.0, 0.5
  q = _np_targets(f, z, T, w)
  np.testing.assert_allclose(bake_loss(f, z, T, w), _np_bake(q, z.astype(np.float64), T), rtol=1e-4, atol=1e-6)
  grad = np.asarray(jax.jit(jax.grad(lambda l: bake_loss(f, l, T, w).sum()))(jnp.asarray(z)))
  # analytic: d/dz T^2 KL(Q || softmax(z/T)) = T (softmax(z/T) - Q) with Q constant
  np.testing.assert_allclose(grad, T * (_softmax(z.astype(np.float64) / T) - q), rtol=1e-4, atol=1e-6)
  # central finite differences of the NumPy loss with Q held fixed
  z64, eps = z.astype(np.float64), 1e-5
  fd = np.zeros_like(z64)
  for idx in np.ndindex(*z.shape):
    dz = np.zeros_like(z64)
    dz[idx] = eps
    fd[idx] = (_np_bake(q, z64 + dz, T).sum() - _np_bake(q, z64 - dz, T).sum()) / (2 * eps)
  np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-5)


def test_no_gradient_flows_into_the_soft_targets():
  f, z = _batch(b=8, seed=4)
  g_f, g_z = jax.jit(jax.grad(lambda e, l: soft_targets(e, l, 4.0, 0.5).sum(axis=0) @ jnp.arange(5.0),
                              argnums=(0, 1)))(jnp.asarray(f), jnp.asarray(z))
  assert np.all(np.asarray(g_f) == 0) and np.all(np.asarray(g_z) == 0)
  # the embeddings enter the loss only through Q: no gradient reaches the backbone's features from BAKE
  g_emb = jax.jit(jax.grad(lambda e: bake_loss(e, z, 4.0, 0.5).sum()))(jnp.asarray(f))
  assert np.all(np.asarray(g_emb) == 0)
  # with w = 0 the targets are the sample's own detached prediction: zero loss and zero gradient
  np.testing.assert_allclose(bake_loss(f, z, 4.0, 0.0), 0.0, atol=1e-5)
  g0 = jax.jit(jax.grad(lambda l: bake_loss(f, l, 4.0, 0.0).sum()))(jnp.asarray(z))
  np.testing.assert_allclose(g0, 0.0, atol=1e-6)


# ---- method and auxiliary-loss mechanism -------------------------------------------------------------------
def _task(c=5, seen=3):
  from incremental_jax.methods.base import TaskInfo
  m = np.r_[np.ones(seen), np.zeros(c - seen)].astype(np.float32)
  return TaskInfo(index=jnp.int32(1), old=jnp.asarray(np.r_[1.0, 0, 0, 0, 0].astype(np.float32)),
                  new=jnp.asarray(m - np.r_[1.0, 0, 0, 0, 0].astype(np.float32)), seen=jnp.asarray(m),
                  trainable=jnp.asarray(m), lr=jnp.float32(0.1), epochs=jnp.float32(1),
                  steps_per_epoch=jnp.float32(1))


def test_aux_losses_add_bake_to_any_method_and_bake_method_is_ce_plus_bake():
  from configs import bake as bake_cfg, icarl as icarl_cfg
  from incremental_jax.losses import cross_entropy
  from incremental_jax.methods import build_method
  f, z = _batch(b=8, seed=5)
  labels = np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int32)
  outputs, batch, task = {'embedding': jnp.asarray(f), 'logits': jnp.asarray(z)}, {'label': labels}, _task()
  teacher = {'logits': jnp.asarray(z[::-1].copy())}
  plain = build_method(icarl_cfg.get_config('test'), 10, (8, 8, 1))
  with_bake = build_method(bake_cfg.on_method('icarl', 'test')(None), 10, (8, 8, 1))
  base_loss, _ = jax.jit(plain.loss)(outputs, batch, task, teacher, {})
  total, metrics = jax.jit(with_bake.loss)(outputs, batch, task, teacher, {})
  ref = _np_bake(_np_targets(f, z[:, :3], 4.0, 0.5), z[:, :3].astype(np.float64), 4.0).mean()
  np.testing.assert_allclose(metrics['aux_bake'], ref, rtol=1e-4)
  np.testing.assert_allclose(total, float(base_loss) + 1.0 * ref, rtol=1e-4)
  assert 'kd' in metrics  # the method's own terms are kept
  # the BAKE method: CE over the seen classes + r * the same term
  cfg = bake_cfg.get_config('test')
  cfg.method.weight = 0.5
  method = build_method(cfg, 10, (8, 8, 1))
  loss, m = jax.jit(method.loss)(outputs, batch, task, None, {})
  ce = float(cross_entropy(z, labels, task.seen).mean())
  np.testing.assert_allclose(loss, ce + 0.5 * ref, rtol=1e-4)
  np.testing.assert_allclose(m['bake'], ref, rtol=1e-4)


def test_unknown_aux_loss_is_a_clear_error(tmp_path):
  from configs import icarl as icarl_cfg
  import incremental_jax
  from incremental_jax.validate import ConfigError
  with pytest.raises(ValueError, match=r"valid names: \['bake'"):
    auxiliary.with_aux_losses(lambda *a: (0.0, {}), {'bakee': {}})
  c = icarl_cfg.get_config('test')
  c.method.aux_losses = ConfigDict({'bakee': {'weight': 1.0}})
  with pytest.raises(ConfigError, match='bakee'):
    incremental_jax.train_and_evaluate(c, str(tmp_path / 'x'))
  fn = lambda *a: (0.0, {})
  assert auxiliary.with_aux_losses(fn, None) is fn and auxiliary.with_aux_losses(fn, ConfigDict()) is fn


# ---- intra-class sampler -----------------------------------------------------------------------------------
def test_intra_class_sampler_batches_hold_anchors_with_same_class_partners():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(6), [20, 15, 9, 30, 3, 1])       # classes 4 and 5 are smaller than M + 1
  indices = 1000 + rng.permutation(len(labels))                 # arbitrary example ids, labels aligned
  M, B = 3, 32
  rows = pipeline.intra_class_sampler(indices, labels, B, np.random.default_rng(7), same_class_per_anchor=M)
  n_anchor = B // (M + 1)
  # drop_last=False (the default): ceil(78 / 8) = 10 batches, the last with 6 anchor groups and 2 of padding (-1)
  assert rows.shape == (-(-len(labels) // n_anchor), B)
  label_of = dict(zip(indices, labels))
  size_of = np.bincount(labels)
  groups = rows.reshape(-1, n_anchor, M + 1)
  assert (groups[-1, 6:] == -1).all() and (rows[rows < 0] == -1).all() and (rows < 0).sum() == 2 * (M + 1)
  groups = groups[groups[..., 0] >= 0]
  anchors = groups[..., 0].ravel()
  assert sorted(anchors) == sorted(indices)                     # each example an anchor exactly once per epoch
  for g in groups.reshape(-1, M + 1):
    a, partners = g[0], g[1:]
    assert all(label_of[p] == label_of[a] for p in partners)
    if size_of[label_of[a]] > M:                                # without replacement, never itself
      assert a not in partners and len(set(partners)) == M
    elif size_of[label_of[a]] > 1:
      assert a not in partners
  again = pipeline.intra_class_sampler(indices, labels, B, np.random.default_rng(7), same_class_per_anchor=M)
  other = pipeline.intra_class_sampler(indices, labels, B, np.random.default_rng(8), same_class_per_anchor=M)
  assert np.array_equal(rows, again) and not np.array_equal(rows, other)
  dropped = pipeline.intra_class_sampler(indices, labels, B, np.random.default_rng(7), same_class_per_anchor=M,
                                         drop_last=True)   # the old loop: the anchors' last partial batch dropped
  np.testing.assert_array_equal(dropped, rows[:len(labels) // n_anchor])
  with pytest.raises(ValueError, match='multiple of'):
    pipeline.intra_class_sampler(indices, labels, 30, np.random.default_rng(0), same_class_per_anchor=3)


def test_partners_are_uniform_over_class_mates():
  labels = np.zeros(5, np.int64)
  counts = np.zeros((5, 5))
  for s in range(400):
    p = pipeline.same_class_partners(labels, 2, np.random.default_rng(s))
    np.add.at(counts, (np.repeat(np.arange(5), 2), p.ravel()), 1)
  assert np.all(np.diag(counts) == 0)
  off = counts[~np.eye(5, dtype=bool)]
  np.testing.assert_allclose(off / 400, 0.5, atol=0.1)          # each of the 4 mates chosen with prob. 2/4


def test_same_class_per_anchor_reaches_the_sampler_kwargs():
  from configs import bake as bake_cfg
  c = bake_cfg.get_config('digits')
  assert c.data.sampler == 'intra_class' and dict(c.data.sampler_kwargs) == {'same_class_per_anchor': 3}
  c.data.same_class_per_anchor = 1                              # e.g. --config.data.same_class_per_anchor=1
  assert dict(c.data.sampler_kwargs) == {'same_class_per_anchor': 1}


# ---- global batch on 8 simulated devices -------------------------------------------------------------------
SCRIPT = textwrap.dedent('''
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from incremental_jax import parallel, train
    from incremental_jax.data import augment
    from incremental_jax.losses.bake import bake_loss
    from incremental_jax.methods import build_method
    from incremental_jax.methods.base import Phase
    from incremental_jax.models import build_model
    from configs import bake as bake_cfg
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    f = rng.normal(size=(32, 6)).astype(np.float32)
    z = (3 * rng.normal(size=(32, 5))).astype(np.float32)

    def loss_and_grad(devices, e, l):
      mesh = parallel.make_mesh(devices)
      shard = parallel.batch_sharded(mesh)
      fn = jax.jit(jax.value_and_grad(lambda l, e: bake_loss(e, l, 4.0, 0.5).sum()), in_shardings=(shard, shard))
      e, l = jax.device_put(e, shard), jax.device_put(l, shard)
      assert len(e.sharding.device_set) == len(devices)
      v, g = fn(l, e)
      return float(v), np.asarray(g).tolist()

    v1, g1 = loss_and_grad(jax.devices()[:1], f, z)
    v8, g8 = loss_and_grad(jax.devices(), f, z)
    # what a per-device implementation would give: each device's 4 rows ensembled on their own
    local_grad = jax.jit(jax.vmap(jax.grad(lambda l, e: bake_loss(e, l, 4.0, 0.5).sum())))
    local = np.asarray(local_grad(z.reshape(8, 4, 5), f.reshape(8, 4, 6))).reshape(32, 5).tolist()

    # a whole BAKE train step (ResNet, BatchNorm, augmentation), twice, on 1 and on 8 devices
    config = bake_cfg.get_config('test')
    config.method.temperature = 1.0   # sharper predictions than T=4 on an untrained net: a larger BAKE term
    method = build_method(config, 10, (8, 8, 1))
    model = build_model(config.model, 10, (8, 8, 1), seed=0)
    optim = config.optim.copy_and_resolve_references()
    optim.batch_size = 16
    phase = Phase('train', method.loss, np.arange(16), optim)
    aug = augment.make_augment_fn(config.data.augment, (0.5,), (0.25,))
    batch = {'image': rng.integers(0, 255, (16, 8, 8, 1)).astype(np.uint8), 'label': np.repeat(np.arange(4), 4).astype(np.int32)}
    task = train.make_task_info(type('S', (), {'class_masks': lambda self, t: {
        'old': np.zeros(10, np.float32), 'new': np.ones(10, np.float32), 'seen': np.ones(10, np.float32)}})(), 0, np.ones(10))
    task = task.replace(lr=jnp.float32(0.1), epochs=jnp.float32(1), steps_per_epoch=jnp.float32(2))

    def run(devices):
      mesh = parallel.make_mesh(devices)
      state = train.init_train_state(model, mesh, train.make_optimizer(optim))
      step = jax.jit(train.make_train_step(model, method, phase, aug, has_teacher=False),
                     out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)))
      bake = []
      for _ in range(2):
        state, metrics = step(state, None, parallel.replicate(task, mesh), parallel.shard_batch(batch, mesh, 16))
        bake.append(float(metrics['bake']))
      return bake, jax.device_get(state.params)

    b1, p1 = run(jax.devices()[:1])
    b8, p8 = run(jax.devices())
    diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), p1, p8)))
    print(json.dumps({'v1': v1, 'v8': v8, 'g1': g1, 'g8': g8, 'local': local, 'bake1': b1, 'bake8': b8,
                      'param_diff': diff}))
''')


def test_global_batch_on_eight_devices_matches_one_device(eight_devices):
  r = eight_devices(SCRIPT)
  rng = np.random.default_rng(0)  # the script's arrays
  f = rng.normal(size=(32, 6)).astype(np.float32)
  z = (3 * rng.normal(size=(32, 5))).astype(np.float32)
  ref = _np_bake(_np_targets(f, z, 4.0, 0.5), z.astype(np.float64), 4.0).sum()
  np.testing.assert_allclose(r['v1'], ref, rtol=1e-4)
  np.testing.assert_allclose(r['v8'], ref, rtol=1e-4)
  np.testing.assert_allclose(r['g8'], r['g1'], rtol=1e-5, atol=1e-6)
  # the gradient is T (softmax(z/T) - Q): per-device ensembles would give a clearly different one
  assert np.abs(np.subtract(r['local'], r['g1'])).max() > 0.1 * np.abs(r['g1']).max()
  assert r['bake1'][0] > 0 and abs(r['bake1'][1] - r['bake1'][0]) > 1e-6
  np.testing.assert_allclose(r['bake8'], r['bake1'], rtol=1e-4, atol=1e-6)
  assert r['param_diff'] < 1e-5, r


# ---- end to end on digits ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_single_task_bake_and_cross_entropy_runs_on_digits(digits_run):
  bake = digits_run('bake', preset='test')
  ce = digits_run('bake', preset='test', method__name='finetune')
  for r, name in ((bake, 'bake'), (ce, 'finetune')):
    assert r['method'] == name and r['num_tasks'] == 1 and r['task_sizes'] == [10]
    assert r['accuracy_matrix']['cnn'] == [[r['last_accuracy']['cnn']]]
    assert r['average_forgetting']['cnn'] is None and r['steps'][0]['cnn']['old'] is None
    assert r['last_accuracy']['cnn'] > 40                      # one epoch of 179 steps: far above chance (10%)
  # same batches and steps, different objective: BAKE's total loss includes its distillation term
  assert bake['steps'][0]['epoch_losses']['train'] != ce['steps'][0]['epoch_losses']['train']
  print(f"digits (test preset, 1 epoch): BAKE {bake['last_accuracy']['cnn']:.2f}  CE {ce['last_accuracy']['cnn']:.2f}")
