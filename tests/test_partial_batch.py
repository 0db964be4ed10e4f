"""The last partial batch of an epoch (`data.drop_last=False`, PyTorch DataLoader's default): the samplers pad it
with -1, the batch carries `weight` (0 for padding), BatchNorm's statistics and every loss cover the real
examples only. The invariant: a batch of n real examples padded to B with junk trains exactly as the same batch
of n examples alone (one compiled shape instead of two)."""
import functools
import importlib
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from incremental_jax import parallel, train
from incremental_jax.data import augment, pipeline
from incremental_jax.methods import build_method
from incremental_jax.methods.base import Phase, snapshot
from incremental_jax.models.resnet import Layers, batch_norm

N_CLASSES, SHAPE = 10, (8, 8, 1)


# ---- samplers ------------------------------------------------------------------------------------------------
def test_shuffle_sampler_keeps_the_last_partial_batch_padded_with_minus_one():
  idx = np.arange(1000, 1075)
  for seed in range(3):
    rows = pipeline.shuffle_sampler(idx, None, 16, np.random.default_rng(seed))
    assert rows.shape == (5, 16)                      # ceil(75 / 16)
    assert sorted(rows[rows >= 0].tolist()) == idx.tolist()   # every example exactly once
    assert (rows[:4] >= 0).all() and (rows[4, :11] >= 0).all() and (rows[4, 11:] == -1).all()
    np.testing.assert_array_equal(pipeline.batch_weight(rows)[4], [1] * 11 + [0] * 5)
  small = pipeline.shuffle_sampler(np.arange(5), None, 8, np.random.default_rng(0))
  assert small.shape == (1, 8) and sorted(small[0, :5]) == list(range(5)) and (small[0, 5:] == -1).all()
  exact = pipeline.shuffle_sampler(np.arange(32), None, 16, np.random.default_rng(0))
  assert exact.shape == (2, 16) and (exact >= 0).all()
  np.testing.assert_array_equal(pipeline.loadable(small)[0, 5:], 0)


def test_intra_class_sampler_pads_whole_anchor_groups():
  labels = np.repeat(np.arange(4), 10)[:37]            # 37 examples of 4 classes
  idx = np.arange(200, 237)
  rows = pipeline.intra_class_sampler(idx, labels, 8, np.random.default_rng(1), same_class_per_anchor=1)
  assert rows.shape == (10, 8)                         # ceil(37 / 4) anchor batches of 4 anchors
  groups = rows.reshape(10, 4, 2)
  anchors = groups[..., 0]
  assert sorted(anchors[anchors >= 0].tolist()) == idx.tolist()   # each example an anchor exactly once
  assert ((groups[..., 0] >= 0) == (groups[..., 1] >= 0)).all()  # a group is real or padding as a whole
  assert (groups[-1, 1:] == -1).all() and (groups[-1, 0] >= 0).all()   # 37 = 9 * 4 + 1
  real = groups[groups[..., 0] >= 0]
  np.testing.assert_array_equal(labels[real[:, 0] - 200], labels[real[:, 1] - 200])   # partners of its class
  dropped = pipeline.intra_class_sampler(idx, labels, 8, np.random.default_rng(1), same_class_per_anchor=1,
                                         drop_last=True)
  assert dropped.shape == (9, 8) and (dropped >= 0).all()


def test_epoch_plan_follows_data_drop_last():
  from test_runs import _phase_setup   # tests/ is on the path under pytest
  config, _, trainer, _, labels, phases, _ = _phase_setup()
  phase = Phase('train', trainer.method.loss, np.arange(45), phases[0].optim)   # 45 = 2 * 16 + 13
  assert [len(p) for p in trainer.epoch_plan(phase, labels[0], (0,))] == [3, 3]
  config.data.drop_last = True
  try:
    assert [len(p) for p in trainer.epoch_plan(phase, labels[0], (0,))] == [2, 2]
  finally:
    config.data.drop_last = False


# ---- BatchNorm -----------------------------------------------------------------------------------------------
def test_masked_batch_norm_uses_the_real_examples_statistics():
  """NumPy reference: normalisation by the real examples' mean and biased variance (as PyTorch's BatchNorm2d in
  training mode); the running statistics updated from them with momentum 0.1, the running variance from their
  unbiased variance, n / (n - 1) times the biased one with n the real values per channel (PyTorch's update,
  `resnet.TorchBatchNorm`; flax's own takes the biased one): the same as a batch of the real examples alone."""
  rng = np.random.default_rng(0)
  bn = Layers().bn(3, nnx.Rngs(0))
  bn.scale[...] = jnp.asarray(rng.normal(size=3), jnp.float32)
  bn.bias[...] = jnp.asarray(rng.normal(size=3), jnp.float32)
  x = rng.normal(size=(6, 4, 4, 3)).astype(np.float32) * 2 + 1
  x[4:] = 100.0                                        # junk in the padded slots
  mask = np.array([1, 1, 1, 1, 0, 0], bool)
  y = np.asarray(batch_norm(bn, jnp.asarray(x), True, jnp.asarray(mask)))
  real = x[:4].astype(np.float64)
  mean, var = real.mean((0, 1, 2)), real.var((0, 1, 2))
  ref = (x - mean) / np.sqrt(var + 1e-5) * np.asarray(bn.scale[...]) + np.asarray(bn.bias[...])
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(bn.mean[...]), 0.1 * mean, rtol=1e-5, atol=1e-6)
  n = real.size // real.shape[-1]
  np.testing.assert_allclose(np.asarray(bn.var[...]), 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
  # inference mode ignores the mask: the running statistics, unchanged
  before = np.asarray(bn.var[...])
  batch_norm(bn, jnp.asarray(x), False, jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(bn.var[...]), before)


# ---- one step: padded batch == unpadded batch, for each method -----------------------------------------------
def _config(module: str, method_name: str = '', **model):
  cfg = importlib.import_module(f'incremental_jax.configs.{module}').get_config('test')
  if method_name:
    cfg.method.name = method_name
  cfg.model.update(model)
  cfg.data.augment.update(crop_padding=0, flip=False, brightness=0.0)   # the augmentation is per position
  return cfg


def _perturbed(tree, seed: int, scale: float = 0.2):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + scale * jnp.abs(x).mean() * jax.random.normal(k, x.shape, x.dtype)
                                      for x, k in zip(leaves, keys)])


def _frozen(method, state, mesh):
  """The frozen pytree of the method's teacher kind: a snapshot that differs from the student."""
  from incremental_jax.methods import iekd, m2kd
  if isinstance(method, m2kd.PrunedSnapshotTraining):
    dense = _perturbed(snapshot(state), 4)
    return {'dense': dense, 'mask': m2kd.weight_masks(dense['params'], 0.5)}
  if isinstance(method, iekd._ReconstructTeacherFeatures):
    return _perturbed(dict(zip(('params', 'batch_stats'), method.teacher_model.init_variables())), 5)
  if method.teacher == 'last':
    return _perturbed(snapshot(state), 1)
  if method.teacher == 'all':   # M2KD: two stored (pruned) snapshots of a stack of 3 slots
    from incremental_jax.methods.m2kd import append_snapshot, store_snapshot
    frozen = None
    for j, classes in enumerate(([1, 1, 1, 1] + [0] * 6, [0] * 4 + [1, 1, 1, 0, 0, 0])):
      stored = store_snapshot(_perturbed(snapshot(state), 10 + j), float(method.mcfg.prune_keep))
      frozen = append_snapshot(frozen, stored, np.array(classes, np.float32), True, 3)
    return parallel.replicate(frozen, mesh)
  if method.teacher == 'pretrained':   # IE-KD: a teacher network and its factor autoencoder
    vars_of = lambda name, seed: _perturbed(dict(zip(('params', 'batch_stats'),
                                                     method.networks[name].init_variables())), seed)
    return {'teacher': vars_of('teacher', 2), 'autoencoder': vars_of('autoencoder', 3)}
  return None


def _task(single_task: bool):
  old = np.zeros(N_CLASSES, np.float32) if single_task else np.array([1] * 4 + [0] * 6, np.float32)
  new = np.ones(N_CLASSES, np.float32) if single_task else np.array([0] * 4 + [1] * 3 + [0] * 3, np.float32)
  seen = np.minimum(old + new, 1)
  return train.TaskInfo(index=jnp.int32(0 if single_task else 1), old=jnp.asarray(old), new=jnp.asarray(new),
                        seen=jnp.asarray(seen), trainable=jnp.asarray(new), lr=jnp.float32(0.05),
                        epochs=jnp.float32(10), steps_per_epoch=jnp.float32(1), seed=jnp.int32(0))


CASES = {
    'icarl': ('icarl', ''), 'lucir': ('lucir', ''), 'podnet': ('podnet', ''), 'bake': ('bake', ''),
    'm2kd': ('m2kd', ''), 'iekd': ('iekd', ''), 'iekd_dml': ('iekd', 'iekd_dml'),
    'lucir_bake': ('bake', 'lucir_digits'),
    'm2kd_pruned_snapshot': ('m2kd', ''), 'iekd_autoencoder': ('iekd', ''),
}


@functools.lru_cache(maxsize=None)
def _method(case: str):
  module, name = CASES[case]
  if case == 'lucir_bake':   # BAKE as an auxiliary term of LUCIR (its loss + masked affinity)
    cfg = importlib.import_module('incremental_jax.configs.bake').get_config('lucir_digits')
    cfg.model.update(width=4)
    cfg.data.augment.update(crop_padding=0, flip=False, brightness=0.0)
  elif case == 'podnet':     # PODNet's own backbone
    cfg = _config(module, name, backbone='rebuffi', depth=14)
  else:
    cfg = _config(module, name)
  method = build_method(cfg, N_CLASSES, SHAPE)
  if case == 'm2kd_pruned_snapshot':   # the retraining of a pruned snapshot (a SubnetworkTrainer phase)
    method = method.pruned_snapshot_training
  elif case == 'iekd_autoencoder':     # IE-KD's teacher autoencoder, trained on the teacher's feature maps
    from incremental_jax.methods.iekd import _ReconstructTeacherFeatures
    method = _ReconstructTeacherFeatures(cfg, method.networks['teacher'], method.networks['autoencoder'], 'l1')
  return cfg, method


def _one_step(case: str, batch: dict):
  cfg, method = _method(case)
  mesh = parallel.make_mesh()
  model = method.model
  optim = ConfigDict(dict(cfg.optim, lr=0.05, schedule='constant', milestones=()))
  phase = Phase('train', method.loss, np.arange(8), optim)
  state = train.init_train_state(model, mesh, train.make_optimizer(optim))
  frozen = _frozen(method, state, mesh)
  single = method.teacher in ('pretrained', 'none')
  aug = augment.make_augment_fn(cfg.data.augment, (0.5,), (0.25,))
  step = jax.jit(method.make_train_step(model, phase, aug, has_teacher=frozen is not None))
  return step(state, frozen, _task(single), {k: jnp.asarray(v) for k, v in batch.items()})


def _batches(labels=(0, 4, 4, 1, 5, 6, 2, 5), n: int = 5, seed: int = 0):
  """A batch of `n` real examples (old and new classes, some twice) and the same examples padded to
  len(labels) with other images and labels of weight 0."""
  rng = np.random.default_rng(seed)
  size = len(labels)
  image = rng.integers(0, 255, (size,) + SHAPE).astype(np.uint8)
  label = np.asarray(labels, np.int32)
  real = {'image': image[:n], 'label': label[:n]}
  padded = {'image': image, 'label': label, 'weight': (np.arange(size) < n).astype(np.float32)}
  return real, padded


def _assert_same(a, b, what: str, rtol: float = 1e-5):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-5,
                               err_msg=f'{what} {jax.tree_util.keystr(path)}')


@pytest.mark.parametrize('case', list(CASES))
def test_padded_step_equals_the_step_on_the_real_examples(case):
  # exemplar-free M2KD trains on the new classes only (its cross-entropy is over them)
  real, padded = _batches((4, 5, 5, 6, 4, 6, 5, 4) if case == 'm2kd' else (0, 4, 4, 1, 5, 6, 2, 5))
  s_real, m_real = _one_step(case, real)
  s_pad, m_pad = _one_step(case, padded)
  s_init = train.init_train_state(_method(case)[1].model, parallel.make_mesh(),
                                  train.make_optimizer(_method(case)[0].optim))
  moved = max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
              for x, y in zip(jax.tree.leaves(s_real.params), jax.tree.leaves(s_init.params)))
  assert moved > 1e-4                                           # the step really trained
  assert float(m_real['loss']) != 0.0
  # IE-DML's second peer is trained after the first one's update, so its loss carries that update's rounding too
  # (1.3e-5 relative with jax 0.12; a padded example counted as real moves it by percents)
  rtol = 5e-5 if case == 'iekd_dml' else 1e-5
  _assert_same(m_pad, m_real, 'metric', rtol)
  _assert_same(s_pad.params, s_real.params, 'params', rtol)
  _assert_same(s_pad.batch_stats, s_real.batch_stats, 'batch_stats', rtol)


def test_weights_of_one_are_the_unweighted_batch():
  real, _ = _batches()
  s_real, m_real = _one_step('lucir', real)
  s_ones, m_ones = _one_step('lucir', {**real, 'weight': np.ones(len(real['label']), np.float32)})
  _assert_same(m_ones, m_real, 'metric')
  _assert_same(s_ones.params, s_real.params, 'params')
  _assert_same(s_ones.batch_stats, s_real.batch_stats, 'batch_stats')


# ---- the epoch loop: padded last batches == batches of exactly the real examples ------------------------------
@functools.lru_cache(maxsize=None)
def _loop_setup(chunk_steps: int = 1):
  from incremental_jax import config as cfglib
  from incremental_jax.methods.baselines import Finetune
  config = cfglib.test_preset(cfglib.base_config())
  config.method.name = 'finetune'
  config.data.augment.update(crop_padding=0)   # per-position random crops would differ between batch sizes
  config.data.chunk_steps = chunk_steps
  method = Finetune(config, 4, SHAPE)
  mesh = parallel.make_mesh()
  aug = augment.make_augment_fn(config.data.augment, (0.5,), (0.25,))
  trainer = train.Trainer(method.model, method, mesh, aug, show_progress=False)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (120,) + SHAPE).astype(np.uint8)
  labels = [rng.integers(0, 4, 120), rng.integers(0, 4, 120)]
  optim = ConfigDict(dict(config.optim, epochs=2, batch_size=16, lr=0.05))
  # run 0: 45 examples = 2 full batches + 13; run 1: 70 = 4 full batches + 6
  phases = [Phase('train', method.loss, np.arange(45), optim), Phase('train', method.loss, np.arange(40, 110), optim)]
  task = train.make_task_info(type('S', (), {'class_masks': lambda self, t: {
      'old': np.zeros(4, np.float32), 'new': np.ones(4, np.float32), 'seen': np.ones(4, np.float32)}})(), 0,
      np.ones(4, np.float32))
  return trainer, images, labels, phases, task


def _run(k: int, seed: int):
  trainer, _, labels, phases, task = _loop_setup()
  state = train.init_train_state(trainer.model, trainer.mesh, train.make_optimizer(phases[k].optim))
  return train.PhaseRun(state, None, task, phases[k], labels[k], (seed, 0, 0), seed)


@functools.lru_cache(maxsize=None)
def _reference(k: int, seed: int):
  """Run k's epochs stepped by hand as PyTorch's DataLoader(drop_last=False) feeds them: each batch exactly its
  real examples, the last one of an epoch smaller (a second compiled shape)."""
  trainer, images, _, _, _ = _loop_setup()
  run = _run(k, seed)
  plan = trainer.epoch_plan(run.phase, run.labels, run.rng_seed)
  task = parallel.replicate(train._phase_task(run.task, run.phase, len(plan[0]), run.seed), trainer.mesh)
  state = trainer.phase_start(run.state, run.phase)
  step = jax.jit(trainer.method.make_train_step(trainer.model, run.phase, trainer.augment_fn, False))
  losses = []
  for rows in plan:
    assert (rows[-1] < 0).any() and (rows[:-1] >= 0).all()    # a padded last batch in every epoch
    epoch = []
    for row in rows:
      real = row[row >= 0]
      state, metrics = step(state, None, task, {'image': jnp.asarray(images[real]),
                                                'label': jnp.asarray(run.labels[real].astype(np.int32))})
      epoch.append(float(metrics['loss']))
    losses.append(np.mean(epoch))
  return state, losses


def _assert_phase_is(result, reference, rtol: float = 1e-5):
  state, losses = reference
  assert int(result.state.step) == int(state.step)
  for x, y in zip(jax.tree.leaves((result.state.params, result.state.batch_stats)),
                  jax.tree.leaves((state.params, state.batch_stats))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol)
  np.testing.assert_allclose([m['loss'] for m in result.epoch_metrics], losses, rtol=rtol)


@pytest.mark.parametrize('on_device', [True, False])
def test_epochs_with_a_partial_last_batch_equal_exact_size_batches(on_device):
  """One step per dispatch, images on the device (gathered by index, padding clamped) or on the host (loaded
  with their weights): the loop trains ceil(45 / 16) = 3 steps per epoch, as exact-size batches do."""
  trainer, images, *_ = _loop_setup()
  source = pipeline.DeviceImages(images, trainer.mesh) if on_device else images
  (result,) = train.run_phase(trainer, [_run(0, 3)], source)
  assert int(result.state.step) == 6
  _assert_phase_is(result, _reference(0, 3))


def test_chunked_loop_with_partial_batches_equals_step_by_step():
  """chunk_steps=4 (a chunk of 3 steps and 1 skipped) on device images equals the exact-size reference up to the
  chunk program's rounding."""
  trainer, images, *_ = _loop_setup(4)
  (result,) = train.run_phase(trainer, [_run(0, 3)], pipeline.DeviceImages(images, trainer.mesh))
  assert trainer.compile_count == 1
  _assert_phase_is(result, _reference(0, 3), rtol=2e-4)


def test_group_of_runs_with_different_remainders_equals_each_run_alone():
  """Runs of 45 (3 steps, last 13 real) and 70 examples (5 steps, last 6 real) trained as one vmapped group."""
  trainer, images, *_ = _loop_setup()
  group = train.run_phase(trainer, [_run(0, 3), _run(1, 7)], pipeline.DeviceImages(images, trainer.mesh))
  for k, seed in enumerate((3, 7)):
    _assert_phase_is(group[k], _reference(k, seed), rtol=1e-4)


EIGHT_DEVICES = textwrap.dedent("""
    import json
    import jax, numpy as np
    from ml_collections import ConfigDict
    from incremental_jax import parallel, train
    from incremental_jax.configs import bake
    from incremental_jax.data import augment, pipeline
    from incremental_jax.methods import build_method
    from incremental_jax.methods.base import Phase
    assert jax.device_count() == 8

    config = bake.get_config('test')      # intra-class batches of 4 anchors with 3 partners each
    method = build_method(config, 4, (8, 8, 1))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (40, 8, 8, 1)).astype(np.uint8)
    labels = rng.integers(0, 4, 40)
    optim = ConfigDict(dict(config.optim, epochs=1, batch_size=16, lr=0.05))
    # 21 anchors: 6 steps, the last with 1 anchor group = 4 real examples of 16, not a multiple of 8 devices
    phase = Phase('train', method.loss, np.arange(21), optim)
    task = train.make_task_info(type('S', (), {'class_masks': lambda self, t: {
        'old': np.zeros(4, np.float32), 'new': np.ones(4, np.float32), 'seen': np.ones(4, np.float32)}})(), 0,
        np.ones(4, np.float32))

    def run(devices, on_device):
      mesh = parallel.make_mesh(devices)
      trainer = train.Trainer(method.model, method, mesh, augment.make_augment_fn(config.data.augment, (0.5,), (0.25,)),
                              show_progress=False)
      state = train.init_train_state(method.model, mesh, train.make_optimizer(optim))
      source = pipeline.DeviceImages(images, mesh) if on_device else images
      (result,) = train.run_phase(trainer, [train.PhaseRun(state, None, task, phase, labels, (1, 0, 0), 1)], source)
      return jax.device_get(result.state), [m['loss'] for m in result.epoch_metrics]

    s1, l1 = run(jax.devices()[:1], True)
    out = {'steps': int(s1.step), 'loss1': l1}
    for name, on_device in (('device', True), ('host', False)):
      s8, l8 = run(jax.devices(), on_device)
      out[name] = {'loss8': l8, 'max_diff': max(jax.tree.leaves(jax.tree.map(
          lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), (s1.params, s1.batch_stats),
          (s8.params, s8.batch_stats))))}
    print(json.dumps(out))
""")


def test_eight_devices_with_a_partial_batch_not_divisible_by_them_equal_one_device(eight_devices):
  """BAKE (global masked affinity, BatchNorm statistics over the real examples of the global batch) on 8
  simulated devices, images on the device and on the host, equals 1 device."""
  r = eight_devices(EIGHT_DEVICES)
  assert r['steps'] == 6
  for name in ('device', 'host'):
    np.testing.assert_allclose(r[name]['loss8'], r['loss1'], rtol=1e-5)
    assert r[name]['max_diff'] <= 1e-5, r
