import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from incremental_jax import parallel, step as step_lib, train
from incremental_jax.data import augment
from incremental_jax.data.scenario import Scenario
from incremental_jax.methods.base import Phase
from incremental_jax.methods.baselines import Finetune
from incremental_jax.models import build_model
from incremental_jax import config as cfglib


def _task(**kw):
  base = dict(index=jnp.int32(0), old=jnp.zeros(4), new=jnp.ones(4), seen=jnp.ones(4), trainable=jnp.ones(4),
              lr=jnp.float32(0.1), epochs=jnp.float32(10), steps_per_epoch=jnp.float32(4))
  base.update(kw)
  return train.TaskInfo(**base)


def _optim(fields: dict) -> ConfigDict:
  """The base config's optimiser section with `fields` set."""
  optim = cfglib.base_config().optim
  optim.update(fields)
  return optim


def _lr(optim, step, **kw):
  return float(train.learning_rate(_optim(optim), _task(**kw), jnp.int32(step)))


def test_multistep_schedule_per_epoch():
  optim = dict(schedule='multistep', milestones=(3, 6), gamma=0.1)
  # 4 steps per epoch: epochs 0-2 at 0.1, 3-5 at 0.01, 6+ at 0.001
  assert [_lr(optim, s) for s in (0, 11, 12, 23, 24, 39)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_cosine_schedule_epoch_and_step_units():
  assert _lr(dict(schedule='cosine'), 20) == pytest.approx(0.05)  # epoch 5 of 10: half
  assert _lr(dict(schedule='cosine'), 23) == pytest.approx(0.05)  # still epoch 5 (per-epoch steps)
  cont = _lr(dict(schedule='cosine', schedule_unit='step'), 22)  # epoch 5.5
  assert cont == pytest.approx(0.1 * 0.5 * (1 + np.cos(np.pi * 0.55)), rel=1e-5)


def test_warmup_is_linear_over_steps():
  optim = dict(schedule='constant', warmup_epochs=2)
  assert _lr(optim, 0) == pytest.approx(0.1 / 8)
  assert _lr(optim, 3) == pytest.approx(0.1 * 4 / 8)
  assert _lr(optim, 8) == pytest.approx(0.1)


@functools.lru_cache(maxsize=None)
def _setup():
  config = cfglib.test_preset(cfglib.base_config())
  config.method.name = 'finetune'
  config.data.augment.crop_padding = 0
  model = build_model(config.model, 4, (8, 8, 1), seed=0)
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 255, (8, 8, 8, 1)).astype(np.uint8), 'label': np.array([0, 1, 2, 3] * 2)}
  return config, model, batch


def _run_steps(optim, n_steps, trainable=np.ones(4), train_backbone=True):
  config, model, batch = _setup()
  method = Finetune(config, 4, (8, 8, 1))
  phase = Phase('t', method.loss, np.arange(8), _optim(optim), train_backbone=train_backbone)
  aug = augment.make_augment_fn(config.data.augment, (0.5,), (0.25,))
  step = jax.jit(train.make_train_step(model, method, phase, aug, has_teacher=False))
  mesh = parallel.make_mesh()
  state = train.init_train_state(model, mesh, train.make_optimizer(phase.optim))
  task = _task(trainable=jnp.asarray(trainable, jnp.float32), epochs=jnp.float32(10), steps_per_epoch=jnp.float32(1))
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  states = [state]
  for _ in range(n_steps):
    state, _ = step(state, None, task, jbatch)
    states.append(state)
  return model, method, batch, task, states


def test_sgd_matches_pytorch_formula():
  """p <- p - lr * buf,  buf <- momentum * buf + (g + wd * p)   (torch.optim.SGD), lr from the schedule."""
  optim = dict(lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.01, schedule='multistep', milestones=(1,),
               gamma=0.5, epochs=10, batch_size=8)
  model, method, batch, task, states = _run_steps(optim, 2)
  x = augment.normalize(jnp.asarray(batch['image']), (0.5,), (0.25,))

  def loss_of(params, stats):
    out, _ = model.apply(params, stats, x, train=True)
    return method.loss(out, {'label': jnp.asarray(batch['label'])}, task, None, params)[0]

  p0 = states[0].params
  grad = jax.jit(jax.grad(loss_of))
  g0 = grad(p0, states[0].batch_stats)
  buf = jax.tree.map(lambda g, p: g + 0.01 * p, g0, p0)
  p1 = jax.tree.map(lambda p, b: p - 0.1 * b, p0, buf)  # epoch 0: lr 0.1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), states[1].params, p1)
  g1 = grad(p1, states[1].batch_stats)
  buf = jax.tree.map(lambda b, g, p: 0.9 * b + g + 0.01 * p, buf, g1, p1)
  p2 = jax.tree.map(lambda p, b: p - 0.05 * b, p1, buf)  # epoch 1 (1 step per epoch): lr 0.05
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), states[2].params, p2)


def test_masked_descent_applied_by_optax_is_the_masked_sgd_step_to_the_bit():
  rng = np.random.default_rng(0)
  p, u = (jnp.asarray(rng.normal(size=(5, 7)), jnp.float32) for _ in range(2))
  m, lr = jnp.asarray(rng.random((1, 7)) > 0.4, jnp.float32), jnp.float32(0.0137)
  step = jax.jit(lambda p, u, m, lr: optax.apply_updates(p, step_lib.masked_descent(u, lr, m)))
  new = np.asarray(step({'w': p}, {'w': u}, {'w': m}, lr)['w'])
  np.testing.assert_array_equal(new.view(np.int32), np.asarray(p - lr * m * u).view(np.int32))
  np.testing.assert_array_equal(new[:, m[0] == 0], np.asarray(p)[:, m[0] == 0])   # masked columns unmoved


def test_frozen_classes_and_head_only_phase():
  optim = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, schedule='constant', epochs=1, batch_size=8)
  _, _, _, _, states = _run_steps(optim, 2, trainable=np.array([0, 0, 1, 1]))
  before, after = states[0].params, states[-1].params
  k0, k1 = np.asarray(before['head']['kernel']), np.asarray(after['head']['kernel'])
  np.testing.assert_array_equal(k0[:, :2], k1[:, :2])  # frozen classes untouched (no decay either)
  assert not np.allclose(k0[:, 2:], k1[:, 2:])
  assert not np.allclose(before['backbone']['stem_conv']['kernel'], after['backbone']['stem_conv']['kernel'])

  _, _, _, _, states = _run_steps(optim, 2, train_backbone=False)
  before, after = states[0], states[-1]
  jax.tree.map(np.testing.assert_array_equal, before.params['backbone'], after.params['backbone'])
  jax.tree.map(np.testing.assert_array_equal, before.batch_stats, after.batch_stats)
  assert not np.allclose(before.params['head']['kernel'], after.params['head']['kernel'])


def test_shuffle_sampler_covers_each_example_once_per_epoch():
  from incremental_jax.data.pipeline import shuffle_sampler
  idx = np.arange(100, 150)
  # drop_last=False (the default, PyTorch's): 50 = 3 * 16 + 2, the last row holds 2 examples and 14 padding (-1)
  rows = shuffle_sampler(idx, np.zeros(50), 16, np.random.default_rng(0))
  assert rows.shape == (4, 16) and sorted(rows[rows >= 0]) == list(idx) and (rows[-1] < 0).sum() == 14
  # drop_last=True: the last partial batch dropped (3 steps, 48 examples); its full rows are the same draw
  dropped = shuffle_sampler(idx, np.zeros(50), 16, np.random.default_rng(0), drop_last=True)
  assert dropped.shape == (3, 16) and len(set(dropped.ravel())) == 48 and set(dropped.ravel()) <= set(idx)
  np.testing.assert_array_equal(dropped, rows[:3])
  small = shuffle_sampler(np.arange(5), np.zeros(5), 8, np.random.default_rng(0), drop_last=True)
  assert small.shape == (1, 8) and set(small.ravel()) == set(range(5))
  np.testing.assert_array_equal(rows, shuffle_sampler(idx, np.zeros(50), 16, np.random.default_rng(0)))


# ---- chunked epochs, images on the device ------------------------------------------------------------------------
def _chunk_setup(chunk_steps: int):
  from incremental_jax.methods.base import Phase as BasePhase
  from test_runs import _phase_setup   # tests/ is on the path under pytest
  config, model, trainer, images, labels, phases, mesh = _phase_setup()
  config.data.chunk_steps = chunk_steps
  optim = phases[0].optim
  # run 0: 80 examples = 5 steps per epoch of 16; run 1: 48 = 3 steps
  phases = [BasePhase('train', trainer.method.loss, np.arange(80), optim),
            BasePhase('train', trainer.method.loss, np.arange(60, 108), optim)]
  task = train.make_task_info(type('S', (), {'class_masks': lambda self, t: {
      'old': np.zeros(4, np.float32), 'new': np.ones(4, np.float32), 'seen': np.ones(4, np.float32)}})(), 0,
      np.ones(4, np.float32))
  init = lambda s: train.init_train_state(build_model(config.model, 4, (8, 8, 1), seed=s), mesh,
                                          train.make_optimizer(config.optim))
  return trainer, images, labels, phases, task, init, mesh


def _assert_same_phase(a, b):
  assert int(a.state.step) == int(b.state.step)
  for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params)):
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)   # a chunk is one program: other float rounding
  np.testing.assert_allclose([m['loss'] for m in a.epoch_metrics], [m['loss'] for m in b.epoch_metrics], rtol=1e-4)


@pytest.mark.parametrize('on_device', [True, False])
def test_chunked_epochs_with_masked_tail_steps_equal_step_by_step(on_device):
  """Epochs of 5 steps in chunks of 4 (the second chunk's last 3 steps are padding, skipped) train exactly the
  5 steps per epoch of the step-by-step loop, from device or host images; chunks of 1 on device images
  give the step-by-step loop's numbers exactly."""
  from incremental_jax.data import pipeline
  trainer1, images, labels, phases, task, init, mesh = _chunk_setup(1)
  (ref,) = train.run_phase(trainer1, [train.PhaseRun(init(3), None, task, phases[0], labels[0], (3, 0, 0), 3)], images)
  assert int(ref.state.step) == 10
  trainer4 = _chunk_setup(4)[0]
  source = pipeline.DeviceImages(images, mesh) if on_device else images
  (got,) = train.run_phase(trainer4, [train.PhaseRun(init(3), None, task, phases[0], labels[0], (3, 0, 0), 3)], source)
  _assert_same_phase(got, ref)
  assert trainer4.compile_count == 1
  (same,) = train.run_phase(trainer1, [train.PhaseRun(init(3), None, task, phases[0], labels[0], (3, 0, 0), 3)],
                            pipeline.DeviceImages(images, mesh))
  jax.tree.map(np.testing.assert_array_equal, same.state.params, ref.state.params)


def test_chunked_group_with_uneven_steps_equals_each_run_alone():
  from incremental_jax.data import pipeline
  trainer, images, labels, phases, task, init, mesh = _chunk_setup(4)
  group = train.run_phase(trainer, [train.PhaseRun(init(s), None, task, ph, lab, (s, 0, 0), s)
                                    for s, ph, lab in zip((3, 7), phases, labels)], pipeline.DeviceImages(images, mesh))
  for k, s in enumerate((3, 7)):
    solo_trainer = _chunk_setup(1)[0]
    (solo,) = train.run_phase(solo_trainer, [train.PhaseRun(init(s), None, task, phases[k], labels[k], (s, 0, 0), s)],
                              images)
    assert int(solo.state.step) == [10, 6][k]
    _assert_same_phase(group[k], solo)


def test_place_images_by_budget_and_device_predictions_equal_host_ones():
  from incremental_jax import evaluate
  from incremental_jax.data import pipeline
  mesh = parallel.make_mesh()
  images = np.random.default_rng(1).integers(0, 255, (70, 8, 8, 1)).astype(np.uint8)
  assert pipeline.place_images(images, mesh, 'auto', budget=images.nbytes - 1) is images
  assert pipeline.place_images(images, mesh, False) is images
  assert pipeline.place_images(images, mesh, 'False') is images   # as the command line gives it
  assert isinstance(pipeline.place_images(images, mesh, 'true', budget=0), pipeline.DeviceImages)
  placed = pipeline.place_images(images, mesh, 'auto', budget=images.nbytes)
  assert isinstance(placed, pipeline.DeviceImages)
  idx = np.array([5, 3, 69, 0, 12])
  np.testing.assert_array_equal(np.asarray(evaluate.take(placed, idx)), images[idx])
  config = cfglib.test_preset(cfglib.base_config())
  model = build_model(config.model, 4, (8, 8, 1), seed=0)
  params, stats = model.init_variables()
  predict = evaluate.make_predict_fn(model, mesh, lambda x: x.astype(jnp.float32) / 255.0, 8)
  for flip in (False, True, 'channel_reverse'):
    host = predict(params, stats, images[idx], flip=flip)
    device = predict(params, stats, evaluate.take(placed, idx), flip=flip)
    for k in host:
      np.testing.assert_allclose(device[k], host[k], rtol=1e-6, atol=1e-6)
