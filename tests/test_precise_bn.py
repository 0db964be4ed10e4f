"""Precise BN (`optim.precise_bn_images`, `optim.precise_bn_mode`; pycls's `compute_precise_bn_stats` after every
epoch, `train.precise_bn_pass`): the running statistics after a phase against references computed batch by batch
with the ordinary training-mode `Model.apply`, padding left out, groups of runs, a resumed phase, 8 devices."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from incremental_jax import config as cfglib, parallel, train, validate
from incremental_jax.configs import bake
from incremental_jax.data import augment, pipeline
from incremental_jax.errors import ConfigError
from incremental_jax.methods.base import Phase
from incremental_jax.methods.baselines import Finetune
from incremental_jax.models import build_model
from incremental_jax.models.network import functional_model
from incremental_jax.models.resnet import Layers, batch_norm

SHAPE, CLASSES, BATCH = (8, 8, 1), 4, 16


# ---- one batch's statistics ---------------------------------------------------------------------------------
class _OneBatchNorm(nnx.Module):
  """A network that is one BatchNorm layer on its input."""

  def __init__(self, rngs: nnx.Rngs):
    self.bn = Layers().bn(3, rngs)

  def __call__(self, x, train: bool = False, mask=None):
    return {'y': batch_norm(self.bn, x, train, mask)}


def test_batch_statistics_of_a_batch_norm_layer_are_its_inputs_mean_and_variance():
  """NumPy: the mean and unbiased variance (PyTorch's running update, `resnet.TorchBatchNorm`) over batch, height
  and width of the layer's input (the real examples' with a mask), whatever the running statistics it starts from."""
  model = functional_model(lambda: _OneBatchNorm(nnx.Rngs(0)), {}, 0, 0)
  params, stats = model.init_variables()
  stats = jax.tree.map(lambda s: s + 3.0, stats)                # running statistics far from the batch's
  x = np.random.default_rng(0).normal(size=(6, 4, 4, 3)).astype(np.float32) * 2 + 1
  got = model.batch_statistics(params, stats, jnp.asarray(x))
  np.testing.assert_allclose(got['bn']['mean'], x.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got['bn']['var'], x.var((0, 1, 2), ddof=1), rtol=1e-5)
  mask = np.array([1, 1, 0, 1, 0, 1], bool)
  got = model.batch_statistics(params, stats, jnp.asarray(x), jnp.asarray(mask))
  np.testing.assert_allclose(got['bn']['mean'], x[mask].mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got['bn']['var'], x[mask].var((0, 1, 2), ddof=1), rtol=1e-5)


def _own_statistics(model, params, stats, x, mask=None):
  """Each layer's batch statistics from the ordinary training-mode apply started at zero running statistics:
  it returns 0.9 * 0 + 0.1 * batch."""
  zeros = jax.tree.map(jnp.zeros_like, stats)
  _, new = model.apply(params, zeros, x, train=True, mask=mask)
  return jax.tree.map(lambda s: s / np.float32(0.1), new)


def test_batch_statistics_of_every_layer_of_a_resnet():
  config = cfglib.test_preset(cfglib.base_config())
  model = build_model(config.model, CLASSES, SHAPE, seed=0)
  params, stats = model.init_variables()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(BATCH,) + SHAPE), jnp.float32)
  got = jax.jit(model.batch_statistics)(params, stats, x)
  want = jax.jit(functools.partial(_own_statistics, model))(params, stats, x)
  assert len(jax.tree.leaves(got)) >= 10
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---- the pass after every epoch -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _setup(chunk_steps: int = 0):
  config = cfglib.test_preset(cfglib.base_config())
  config.method.name = 'finetune'
  config.data.chunk_steps = chunk_steps   # 0: one step a dispatch on CPU
  config.data.augment.update(crop_padding=0, flip=False, brightness=0.0)   # the references need no random draw
  model = build_model(config.model, CLASSES, SHAPE, seed=0)
  method = Finetune(config, CLASSES, SHAPE)
  aug = augment.make_augment_fn(config.data.augment, (0.5,), (0.25,))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (120,) + SHAPE).astype(np.uint8)
  labels = [rng.integers(0, CLASSES, 120), rng.integers(0, CLASSES, 120)]
  return config, model, method, aug, images, labels


def _optim(**fields):
  optim = dict(_setup()[0].optim, epochs=2, batch_size=BATCH, lr=0.05)
  optim.update(fields)
  return ConfigDict(optim)


def _task():
  masks = {'old': np.zeros(CLASSES, np.float32), 'new': np.ones(CLASSES, np.float32),
           'seen': np.ones(CLASSES, np.float32)}
  return train.make_task_info(type('S', (), {'class_masks': lambda self, t: masks})(), 0, np.ones(CLASSES, np.float32))


def _runs(optim, sizes=(48,), seeds=(3,), starts=None, states=None):
  config, model, method, aug, images, labels = _setup()
  mesh = parallel.make_mesh()
  out = []
  for k, (n, s) in enumerate(zip(sizes, seeds)):
    state = states[k] if states else train.init_train_state(build_model(config.model, CLASSES, SHAPE, seed=s), mesh,
                                                            train.make_optimizer(optim))
    phase = Phase('train', method.loss, np.arange(n) + 40 * k, optim)
    out.append(train.PhaseRun(state, None, _task(), phase, labels[k], (s, 0, 0), s,
                              start_epoch=(starts or [0] * len(sizes))[k]))
  return out


def _trainer(chunk_steps: int = 0):
  config, model, method, aug, images, labels = _setup(chunk_steps)
  return train.Trainer(model, method, parallel.make_mesh(), aug, show_progress=False)


def _batches(trainer, run, epoch: int, count: int):
  """The first `count` index rows of the run's epoch and its images, normalised as the (draw-free) augmentation
  does, with each row's mask of real examples."""
  rows = trainer.epoch_plan(run.phase, run.labels, run.rng_seed)[epoch][:count]
  images = _setup()[4]
  return [(trainer.augment_fn(jax.random.key(0), jnp.asarray(images[np.maximum(r, 0)])), jnp.asarray(r >= 0))
          for r in rows]


@pytest.mark.parametrize('size, images, count, chunk, on_device', [
    (48, 32, 2, 0, False), (40, 10_000, 3, 0, False), (40, 32, 2, 4, True)])
def test_average_mode_is_the_mean_of_the_batches_statistics(size, images, count, chunk, on_device):
  """After the last epoch the running statistics are the mean, over the first images // batch_size batches of
  that epoch (at most the epoch's steps), of each batch's statistics from the epoch's final weights. 40 examples
  in batches of 16 end with a batch of 8 and 8 padding entries, which the statistics leave out. Images on the
  host (one batch a dispatch) or on the device (chunks of 4: 2 batches and 2 skipped). The parameters are those
  of the same run without precise BN (the pass changes no weight: BatchNorm trains on batch statistics)."""
  trainer = _trainer(chunk)
  data = pipeline.DeviceImages(_setup()[4], trainer.mesh) if on_device else _setup()[4]
  (run,) = _runs(_optim(precise_bn_images=images, precise_bn_mode='average'), sizes=(size,))
  (result,) = train.run_phase(trainer, [run], data)
  (plain,) = train.run_phase(_trainer(chunk), _runs(_optim(), sizes=(size,)), data)
  for a, b in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(plain.state.params)):
    np.testing.assert_array_equal(a, b)
  batches = _batches(trainer, run, 1, count)
  assert len(batches) == count and bool(batches[-1][1].all()) == (count * BATCH <= size)   # padded: the last one
  own = [_own_statistics(trainer.model, result.state.params, result.state.batch_stats, x, m) for x, m in batches]
  want = jax.tree.map(lambda *s: np.mean(np.stack(s), 0), *own)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(result.state.batch_stats), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert not np.allclose(jax.tree.leaves(plain.state.batch_stats)[0], jax.tree.leaves(want)[0], rtol=1e-3)
  assert trainer.compile_count == 2   # the train step and the precise-BN pass


def test_running_mode_continues_the_running_update_over_the_batches():
  """One epoch, then the first 2 batches of it folded into the running statistics by the training-mode apply,
  from the statistics the epoch's steps left (those of the same run without precise BN)."""
  optim = dict(epochs=1)
  trainer = _trainer()
  (run,) = _runs(_optim(precise_bn_images=40, precise_bn_mode='running', **optim))
  (result,) = train.run_phase(trainer, [run], _setup()[4])
  (plain,) = train.run_phase(_trainer(), _runs(_optim(**optim)), _setup()[4])
  stats = plain.state.batch_stats
  for x, mask in _batches(trainer, run, 0, 2):
    _, stats = trainer.model.apply(plain.state.params, stats, x, train=True, mask=mask)
  for a, b, c in zip(jax.tree.leaves(result.state.batch_stats), jax.tree.leaves(stats),
                     jax.tree.leaves(plain.state.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not all(np.allclose(a, c, rtol=1e-4) for a, c in zip(jax.tree.leaves(result.state.batch_stats),
                                                              jax.tree.leaves(plain.state.batch_stats)))


@pytest.mark.parametrize('mode', ['average', 'running'])
def test_group_equals_each_run_alone(mode):
  """Two runs with 3 and 5 steps per epoch and precise_bn_images 64: 3 and 4 precise batches; the vmapped group
  gives each run the statistics it gets alone."""
  optim = _optim(precise_bn_images=64, precise_bn_mode=mode)
  group = train.run_phase(_trainer(), _runs(optim, sizes=(48, 80), seeds=(3, 7)), _setup()[4])
  for k, (n, s) in enumerate(((48, 3), (80, 7))):
    solo_runs = _runs(optim, sizes=(48, 80), seeds=(3, 7))
    (solo,) = train.run_phase(_trainer(), [solo_runs[k]], _setup()[4])
    for a, b in zip(jax.tree.leaves((group[k].state.params, group[k].state.batch_stats)),
                    jax.tree.leaves((solo.state.params, solo.state.batch_stats))):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('mode', ['average', 'running'])
def test_a_phase_resumed_after_an_epoch_equals_the_uninterrupted_phase(mode):
  """The state an `EpochEnd` yields (what a mid-task checkpoint saves) already holds the epoch's precise
  statistics, and the next epoch's pass takes the same batches: a phase resumed from it ends as the phase run
  through."""
  optim = _optim(epochs=3, precise_bn_images=32, precise_bn_mode=mode)
  flip = ConfigDict(dict(_setup()[0].data.augment, flip=True))   # the pass draws flips: the same on resume
  trainer = train.Trainer(_setup()[1], _setup()[2], parallel.make_mesh(),
                          augment.make_augment_fn(flip, (0.5,), (0.25,)), show_progress=False)
  (full,) = train.run_phase(trainer, _runs(optim), _setup()[4])
  epochs = train.phase_epochs(trainer, _runs(optim), _setup()[4])
  end = next(epochs)
  saved, history = jax.device_get(end.states()[0]), end.histories[0]
  epochs.close()
  resumed_run = _runs(optim, starts=[1], states=[parallel.replicate(saved, trainer.mesh)])[0]
  (resumed,) = train.run_phase(trainer, [dataclasses.replace(resumed_run, history=history)], _setup()[4])
  for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(a, b)
  assert [m['loss'] for m in full.epoch_metrics] == [m['loss'] for m in resumed.epoch_metrics]


@pytest.mark.slow
def test_eight_devices_match_one_device(eight_devices):
  """The pass with the batch sharded over 8 devices (global BatchNorm statistics) gives one device's numbers."""
  out = eight_devices('''
import dataclasses, json, sys
sys.path.insert(0, 'tests')
import jax, numpy as np
from incremental_jax import parallel, train
import test_precise_bn as t
assert jax.device_count() == 8
stats = {}
for mode in ('average', 'running'):
  for n in (1, 8):
    config, model, method, aug, images, labels = t._setup()
    trainer = train.Trainer(model, method, parallel.make_mesh(jax.devices()[:n]), aug, show_progress=False)
    optim = t._optim(precise_bn_images=32, precise_bn_mode=mode)
    mesh = trainer.mesh
    runs = [dataclasses.replace(r, state=parallel.replicate(jax.device_get(r.state), mesh))
            for r in t._runs(optim, sizes=(40,))]
    (result,) = train.run_phase(trainer, runs, images)
    stats[(mode, n)] = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(result.state.batch_stats))]
diff = max(float(np.max(np.abs(a - b))) for mode in ('average', 'running')
           for a, b in zip(stats[(mode, 1)], stats[(mode, 8)]))
moved = max(float(np.max(np.abs(a - b))) for a, b in zip(stats[('average', 1)], stats[('running', 1)]))
print(json.dumps({'diff': diff, 'moved': moved}))
''')
  assert out['diff'] < 1e-4 and out['moved'] > 1e-3, out


# ---- the fields ---------------------------------------------------------------------------------------------
def test_off_by_default_and_in_phases_that_keep_batch_norm_frozen():
  optim = _optim()
  assert optim.precise_bn_images == 0
  phase = Phase('train', None, np.arange(48), optim)
  assert train.precise_bn_batches(phase, 3) == 0
  on = _optim(precise_bn_images=8192)
  assert train.precise_bn_batches(Phase('train', None, np.arange(48), on), 3) == 3
  assert train.precise_bn_batches(Phase('train', None, np.arange(48), on, train_backbone=False), 3) == 0
  assert train.precise_bn_batches(Phase('train', None, np.arange(48), _optim(precise_bn_images=40)), 3) == 2


def test_bake_imagenet_takes_pycls_precise_bn_and_drops_the_last_batch():
  """pycls: BN.NUM_SAMPLES_PRECISE 8192 at a global batch of 512: 16 batches; TRAIN.SYNC_BN True: 'running'."""
  c = bake.get_config('imagenet')
  validate.validate_config(c)
  assert (c.optim.precise_bn_images, c.optim.precise_bn_mode, c.data.drop_last) == (8192, 'running', True)
  assert train.precise_bn_batches(Phase('train', None, np.arange(10), c.optim), 5004) == 16


@pytest.mark.parametrize('field, value, match', [
    ('precise_bn_images', -1, r'optim.precise_bn_images must be an integer >= 0 .*; got -1'),
    ('precise_bn_images', 8, r'optim.precise_bn_images=8 is less than one batch \(optim.batch_size=16\)'),
    ('precise_bn_mode', 'mean', r"optim.precise_bn_mode='mean'; valid: \['average', 'running'\]"),
])
def test_bad_precise_bn_fields_are_config_errors(field, value, match):
  c = bake.get_config('test')
  c.optim.batch_size = 16
  c.optim[field] = value
  with pytest.raises(ConfigError, match=match):
    validate.validate_config(c)


@pytest.mark.slow
def test_image_folder_run_killed_mid_epoch_resumes_to_the_uninterrupted_results(tmp_path):
  """End to end through the Grain loader (host images, RandomResizedCrop on the host, a worker process for the
  killed run): the precise-BN pass after each epoch (8 images in batches of 4: 2 batches), a mid-task checkpoint
  after epoch 1, SIGKILL in epoch 2, resume: results.json and the last checkpoint's train state (the running
  statistics included) equal the uninterrupted run's; without the pass the statistics differ."""
  from test_imagenet_inputs import _folder, _results, _run
  data = _folder(str(tmp_path / 'data'))
  extra = ('--config.optim.precise_bn_images=8', '--config.optim.precise_bn_mode=running')
  full = _run(data, str(tmp_path / 'full'), 0, None, *extra)
  assert full.returncode == 0, full.stderr[-3000:]
  killed = _run(data, str(tmp_path / 'resumed'), 1, 'train_step:5', *extra)
  assert killed.returncode == -9, killed.stderr[-3000:]
  resumed = _run(data, str(tmp_path / 'resumed'), 1, None, *extra)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  plain = _run(data, str(tmp_path / 'plain'), 0)
  assert plain.returncode == 0, plain.stderr[-3000:]
  assert _results(str(tmp_path / 'resumed')) == _results(str(tmp_path / 'full'))
  full_state, resumed_state, plain_state = (_last_train_state(tmp_path / n) for n in ('full', 'resumed', 'plain'))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(full_state), jax.tree.leaves(resumed_state)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(full_state['batch_stats']),
                                                      jax.tree.leaves(plain_state['batch_stats'])))


def _last_train_state(workdir) -> dict:
  """The train state of a workdir's latest checkpoint, as NumPy arrays."""
  import orbax.checkpoint as ocp
  root = workdir / 'checkpoints'
  step = max(int(d.name) for d in root.iterdir() if d.name.isdigit())
  return ocp.StandardCheckpointer().restore(str((root / str(step) / 'train').resolve()))
