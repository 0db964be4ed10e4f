"""IE-KD: factor autoencoder, channel split, losses against NumPy, frozen teacher, teacher checkpoints, IE-DML."""
import dataclasses
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import incremental_jax
from configs import iekd as iekd_cfg
from configs import train as train_cfg
from incremental_jax import method_store, parallel, validate
from incremental_jax import run_spec as run_lib
from incremental_jax import train as train_lib
from incremental_jax.data import augment
from incremental_jax.losses import iekd as L
from incremental_jax.methods import build_method
from incremental_jax.methods import iekd as iekd_lib
from incremental_jax.data.scenario import make_scenario
from incremental_jax.methods.base import Phase, TaskContext
from incremental_jax.methods.iekd import KD
from incremental_jax.models import functional_model
from incremental_jax.models.factor import FactorAutoencoder, channel_split, take_channels
from incremental_jax.validate import ConfigError


def _autoencoder(channels):
  return functional_model(lambda: FactorAutoencoder(channels, 0.5, rngs=nnx.Rngs(params=jax.random.key(0, impl='rbg'))),
                          {}, 0, 0)


@pytest.mark.parametrize('channels', [4, 7, 16, 64])
def test_autoencoder_shapes(channels):
  ae = _autoencoder(channels)
  params, stats = jax.eval_shape(ae.init_variables)
  x = jax.ShapeDtypeStruct((2, 5, 6, channels), jnp.float32)
  out = jax.eval_shape(lambda p, s, x: ae.apply(p, s, x, train=True)[0], params, stats, x)
  f = int(round(channels / 2))
  assert out['factor'].shape == (2, 5, 6, f) and out['reconstruction'].shape == (2, 5, 6, channels)
  # encoder C -> C -> F -> F, decoder F -> F -> C -> C; 3x3 convolutions without bias, each with BatchNorm
  widths = [(channels, channels), (channels, f), (f, f)]
  for part, layers in (('encoder', widths), ('decoder', [(b, a) for a, b in reversed(widths)])):
    for i, (cin, cout) in enumerate(layers):
      assert params[part][f'conv{i}'] == {'kernel': jax.ShapeDtypeStruct((3, 3, cin, cout), jnp.float32)}
      assert params[part][f'bn{i}']['scale'].shape == (cout,)


def _release_coder_numpy(x, layers, train):
  """NumPy reference of the IE-KD release's `Coder` (`model/auto_encoder.py`), the decoder of its
  paraphraser: LeakyReLU(0.1) on the input, then three [3x3 conv (padding 1, no bias) -> BatchNorm ->
  LeakyReLU(0.1)]. NHWC; `layers` = [(kernel [3,3,cin,cout], scale, bias, running mean, running var)];
  BatchNorm normalises by the batch's biased statistics in training, by the running ones in inference."""
  leaky = lambda v: np.where(v >= 0, v, 0.1 * v)
  x = leaky(np.asarray(x, np.float64))
  for kernel, scale, bias, mean, var in layers:
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = sum(np.einsum('bhwc,cd->bhwd', padded[:, i:i + h, j:j + w], kernel[i, j]) for i in range(3) for j in range(3))
    if train:
      mean, var = y.mean((0, 1, 2)), y.var((0, 1, 2))
    x = leaky((y - mean) / np.sqrt(var + 1e-5) * scale + bias)
  return x


@pytest.mark.parametrize('train', [False, True])
def test_decoder_is_the_releases_on_negative_factors(train):
  """The paraphraser's decoder against the release's on a factor with negative entries (a LeakyReLU output),
  where the release's leading LeakyReLU(0.1) is not the identity."""
  channels, f = 6, 3
  ae = _autoencoder(channels)
  params, stats = ae.init_variables()
  rng = np.random.default_rng(0)
  layers = []
  for i, (cin, cout) in enumerate([(f, f), (f, channels), (channels, channels)]):
    kernel = rng.normal(0, 0.5, (3, 3, cin, cout)).astype(np.float32)
    scale, bias, mean = (rng.normal(0, 0.5, cout).astype(np.float32) + a for a in (1.0, 0.0, 0.0))
    var = rng.uniform(0.5, 2.0, cout).astype(np.float32)
    params['decoder'][f'conv{i}']['kernel'] = kernel
    params['decoder'][f'bn{i}'] = {'scale': scale, 'bias': bias}
    stats['decoder'][f'bn{i}'] = {'mean': mean, 'var': var}
    layers.append((kernel, scale, bias, mean, var))
  factor = rng.normal(size=(4, 5, 5, f)).astype(np.float32)
  assert (factor < 0).mean() > 0.3
  decoder = ae.merge(params, stats).decoder
  got = decoder(jnp.asarray(factor), train=train)
  np.testing.assert_allclose(got, _release_coder_numpy(factor, layers, train), rtol=1e-4, atol=1e-4)


def _unit_rows(x):
  x = x.reshape(len(x), -1).astype(np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_inheritance_and_exploration_losses_match_numpy():
  rng = np.random.default_rng(0)
  student, explore, teacher = (rng.normal(size=(3, 2, 2, 5)).astype(np.float32) for _ in range(3))
  s, e, t = _unit_rows(student), _unit_rows(explore), _unit_rows(teacher)
  np.testing.assert_allclose(L.inheritance_loss(student, teacher), np.abs(s - t).mean(1), rtol=1e-5)
  np.testing.assert_allclose(L.exploration_loss(explore, teacher), -np.abs(e - t).mean(1), rtol=1e-5)
  np.testing.assert_allclose(L.inheritance_loss(student, teacher, 'cosine'), 1 - (s * t).sum(1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(L.exploration_loss(explore, teacher, 'cosine'), np.abs((e * t).sum(1)), rtol=1e-5)
  # a scaled copy has the same factor: zero inheritance loss; the L1 form's batch mean is the release's mean
  # over all B*D elements
  np.testing.assert_allclose(L.inheritance_loss(3.0 * teacher, teacher), 0.0, atol=1e-7)
  assert float(L.exploration_loss(explore, teacher).mean()) == pytest.approx(-np.abs(e - t).sum() / e.size, rel=1e-5)
  rec, x = rng.normal(size=(3, 2, 2, 4)), rng.normal(size=(3, 2, 2, 4))
  np.testing.assert_allclose(L.reconstruction_loss(rec, x, 'l1'), np.abs(rec - x).reshape(3, -1).mean(1), rtol=1e-5)
  np.testing.assert_allclose(L.reconstruction_loss(rec, x, 'l2'), ((rec - x) ** 2).reshape(3, -1).mean(1), rtol=1e-5)
  with pytest.raises(ValueError, match='same spatial size'):
    L.inheritance_loss(student, teacher[:, :1])


def test_kd_loss_is_hinton_kd():
  cfg = iekd_cfg.get_config('test')
  cfg.method.name, cfg.method.kd_temperature, cfg.method.kd_alpha = 'kd', 3.0, 0.75
  method = build_method(cfg, 10, (8, 8, 1))
  rng = np.random.default_rng(1)
  s, t, y = rng.normal(size=(4, 10)), rng.normal(size=(4, 10)), np.array([0, 3, 9, 2])
  task = types.SimpleNamespace(seen=jnp.ones(10))
  loss, _ = method.loss({'logits': jnp.asarray(s)}, {'label': jnp.asarray(y)}, task, {'logits': jnp.asarray(t)}, {})
  log_softmax = lambda z: z - np.log(np.exp(z).sum(1, keepdims=True))
  ce = -log_softmax(s)[np.arange(4), y].mean()
  pt, ls = np.exp(log_softmax(t / 3)), log_softmax(s / 3)
  kl = (pt * (np.log(pt) - ls)).sum(1).mean()
  assert float(loss) == pytest.approx(0.25 * ce + 0.75 * 9 * kl, rel=1e-5)


@pytest.mark.parametrize('channels', [8, 9, 64])
@pytest.mark.parametrize('mode', ['natural', 'random'])
def test_split_partitions_the_student_channels(channels, mode):
  inherit, explore = channel_split(channels, mode, seed=3)
  assert len(inherit) == channels // 2 and len(explore) == channels - channels // 2
  assert not set(inherit) & set(explore) and sorted(set(inherit) | set(explore)) == list(range(channels))
  if mode == 'natural':
    np.testing.assert_array_equal(inherit, np.arange(channels // 2))
  else:
    assert not np.array_equal(inherit, np.arange(channels // 2))  # a real permutation (fixed by the seed)
    np.testing.assert_array_equal(inherit, channel_split(channels, mode, seed=3)[0])
  x = np.random.default_rng(0).normal(size=(2, 3, 3, channels)).astype(np.float32)
  np.testing.assert_array_equal(take_channels(jnp.asarray(x), inherit), x[..., inherit])
  np.testing.assert_array_equal(take_channels(jnp.asarray(x), explore), x[..., explore])


def test_release_preset_is_the_releases_yaml():
  """`cifar10_release` against the release's `config/ie_kd.yaml` (and `config/ind/cifar10/resnet20.yaml`, the
  run its frozen ResNet-20 comes from): pairing, shortcuts, weights, optimisers, epochs, batch, factor sizes."""
  cfg = iekd_cfg.get_config('cifar10_release')
  assert (cfg.data.name, cfg.data.increment, cfg.method.name) == ('cifar10', 0, 'iekd')
  assert (cfg.model.backbone, cfg.model.depth, cfg.method.teacher_model.depth) == ('cifar_resnet', 56, 20)
  assert cfg.model.shortcut == cfg.method.teacher_model.shortcut == 'conv'      # resnet56B / resnet20B
  assert (cfg.method.inherit_weight, cfg.method.explore_weight) == (1.0, 1.0)   # *_loss_weight_decay base 1
  assert (cfg.method.split, cfg.method.factor_rate, cfg.method.reconstruction) == ('natural', 0.5, 'l1')
  sgd = {'lr': 0.1, 'momentum': 0.9, 'nesterov': True, 'weight_decay': 5e-4, 'batch_size': 128}
  for optim in (cfg.optim, cfg.method.teacher_optim):     # num_epoch 160, lr_decayT MultiStep [80, 120]
    assert {k: optim[k] for k in sgd} == sgd
    assert (optim.epochs, optim.schedule, tuple(optim.milestones), optim.gamma) == (160, 'multistep', (80, 120), 0.1)
  ae = cfg.method.autoencoder_optim                        # num_epoch_embedS 30, lr_decayS base 0.1 (no decay)
  assert {k: ae[k] for k in sgd} == sgd and (ae.epochs, ae.schedule) == (30, 'constant')
  method = build_method(cfg, 10, (32, 32, 3))
  shapes = {name: jax.tree.map(lambda v: v.shape, nnx.to_pure_dict(net.params_template))
            for name, net in method.networks.items()}
  blocks = lambda p: sum(k.startswith('stage') for k in p['backbone'])
  assert (blocks(shapes['teacher']), blocks(shapes['model'])) == (9, 27)   # ResNet-20, ResNet-56
  assert shapes['autoencoder']['encoder']['conv2']['kernel'] == (3, 3, 32, 32)   # student_embed_args 64 -> 32
  assert shapes['autoencoder']['encoder']['conv0']['kernel'] == (3, 3, 64, 64)
  for part in ('inherit_encoder', 'explore_encoder'):      # teacher_embedI_args / teacher_embedE_args 32 -> 32
    assert [shapes['model'][part][f'conv{i}']['kernel'][2:] for i in range(3)] == [(32, 32)] * 3


def _all_classes_task(n):
  ones = jnp.ones(n)
  return train_lib.TaskInfo(index=jnp.int32(0), old=jnp.zeros(n), new=ones, seen=ones, trainable=ones,
                            lr=jnp.float32(0.1), epochs=jnp.float32(1), steps_per_epoch=jnp.float32(1))


def _iekd_setup(**method_overrides):
  cfg = iekd_cfg.get_config('test')
  cfg.method.update(method_overrides)
  method = build_method(cfg, 10, (8, 8, 1))
  model = method.model
  return cfg, method, model


def test_teacher_checkpoint_round_trip_and_checks(tmp_path):
  """A network saved by the store loads back exactly, whatever optimiser trained it (here one with gradient
  clipping, whose state has another structure than the run's), and is checked against the expected model."""
  cfg, method, _ = _iekd_setup()
  mesh = parallel.make_mesh()
  optim = cfg.optim.copy_and_resolve_references()
  optim.clip_value = 1.0
  state = train_lib.init_train_state(method.networks['teacher'], mesh, train_lib.make_optimizer(optim))
  state = state.replace(params=jax.tree.map(lambda p: p + 1.5, state.params), step=jnp.int32(7))
  teacher_cfg = train_cfg.get_config('test')
  order = np.random.default_rng(0).permutation(10)
  store = method_store.MethodStore(str(tmp_path))
  assert not store.has_network('t')
  store.save_network('t', state, teacher_cfg, order, 10)
  assert store.has_network('t') and os.path.isdir(tmp_path / 't' / 'checkpoints' / '7')
  loaded, meta = method_store.load_network(store.location('t'), method.networks['teacher'], mesh)
  jax.tree.map(np.testing.assert_array_equal, {'params': state.params, 'batch_stats': state.batch_stats},
               jax.tree.map(np.asarray, loaded))
  ctx = types.SimpleNamespace(config=cfg, scenario=types.SimpleNamespace(order=order))
  iekd_lib.check_teacher_meta(meta, cfg.method.teacher_model, ctx, 't')  # matches
  with pytest.raises(ConfigError, match='class order'):
    iekd_lib.check_teacher_meta(meta, cfg.method.teacher_model, types.SimpleNamespace(
        config=cfg, scenario=types.SimpleNamespace(order=np.arange(10))), 't')
  other = cfg.method.teacher_model.copy_and_resolve_references()
  other.depth = 14
  with pytest.raises(ConfigError, match='depth'):
    iekd_lib.check_teacher_meta(meta, other, ctx, 't')
  with pytest.raises(incremental_jax.checkpoint.CheckpointError, match='expected architecture'):
    store.load_network('t', method.model, mesh)  # the student: another network
  with pytest.raises(incremental_jax.checkpoint.CheckpointError, match='configs/train.py'):
    method_store.load_network(str(tmp_path / 'missing'), method.networks['teacher'], mesh)
  assert not os.path.exists(tmp_path / 'missing')  # looking for a checkpoint creates nothing


def test_a_teacher_workdir_without_a_checkpoint_is_refused_before_the_data_loads(tmp_path):
  cfg = iekd_cfg.get_config('test')
  cfg.method.teacher_workdir = str(tmp_path / 'teacher')
  (tmp_path / 'teacher' / 'checkpoints').mkdir(parents=True)
  with pytest.raises(incremental_jax.checkpoint.CheckpointError, match=r'teacher holds no checkpoint .*configs/train'):
    validate.validate_config(cfg)


def test_iedml_without_coupling_is_two_independent_sgd_trainings():
  """With both IE weights 0, each peer's steps are plain SGD on its own cross-entropy: the four-step update
  touches only its part of the parameters and of the momentum buffers."""
  cfg = iekd_cfg.get_config('test')
  cfg.method.update(name='iekd_dml', inherit_weight=0.0, explore_weight=0.0)
  cfg.optim.update(momentum=0.9, nesterov=True, weight_decay=5e-3)
  method = build_method(cfg, 10, (8, 8, 1))
  model = method.model
  mesh = parallel.make_mesh()
  state = train_lib.init_train_state(model, mesh, train_lib.make_optimizer(cfg.optim))
  assert set(state.params) == {'peer_a', 'peer_b', 'autoencoder_a', 'autoencoder_b'}
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.integers(0, 255, (8, 8, 8, 1)), jnp.uint8), 'label': jnp.arange(8) % 10}
  aug = augment.make_augment_fn(cfg.data.augment, (0.5,), (0.25,))
  task = _all_classes_task(10)
  dml_step = jax.jit(method.make_train_step(model, Phase('train', method.loss, np.arange(8), cfg.optim), aug, False))
  dml = state
  for _ in range(2):
    dml, metrics = dml_step(dml, None, task, batch)
  assert np.isfinite(float(metrics['loss'])) and float(metrics['reconstruction_a']) > 0

  # the reference: one IE-KD student network (the peers' structure) trained alone with the default step
  peer_model = iekd_lib.build_model(cfg.model, 10, (8, 8, 1), extend=iekd_lib._student_extension(cfg.method, 8))
  finetune = build_method(train_cfg.get_config('test'), 10, (8, 8, 1))
  step = jax.jit(train_lib.make_train_step(peer_model, finetune, Phase('ref', finetune.loss, np.arange(8), cfg.optim),
                                           aug, False))
  for name in ('peer_a', 'peer_b'):
    ref = train_lib.TrainState(step=state.step, phase_step=state.phase_step, params=state.params[name],
                               batch_stats=state.batch_stats[name],
                               opt_state=train_lib.make_optimizer(cfg.optim).init(state.params[name]))
    for _ in range(2):
      ref, _ = step(ref, None, task, batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), dml.params[name], ref.params)
  for name in ('autoencoder_a', 'autoencoder_b'):  # trained alongside, on reconstruction
    assert not np.allclose(dml.params[name]['encoder']['conv0']['kernel'], state.params[name]['encoder']['conv0']['kernel'])


# ---- end to end on digits (tiny networks) --------------------------------------------------------------
def _context(cfg, model, mesh, workdir):
  return TaskContext(config=cfg, task=0, scenario=make_scenario(10, cfg.data), train_images=None,
                     train_labels=np.arange(10),
                     model=model, state=None, frozen=None, method_state={}, memory=None, embed=None, predict=None,
                     mesh=mesh, store=method_store.MethodStore(workdir),
                     trainer=train_lib.SubnetworkTrainer(mesh, show_progress=False))


def test_teacher_is_trained_in_the_run_once_with_its_own_model_and_optimiser(tmp_path, monkeypatch):
  cfg, method, model = _iekd_setup()
  cfg.method.teacher_optim.epochs = 3
  mesh = parallel.make_mesh()
  calls = []

  def fake_training(ctx, trainer_method, net, name, optim, indices, **kwargs):
    calls.append((name, trainer_method.config, optim))
    state = train_lib.init_train_state(net, mesh, train_lib.make_optimizer(optim))
    return state.replace(params=jax.tree.map(lambda p: p + 2.0, state.params), step=jnp.int32(9))

  monkeypatch.setattr(TaskContext, 'train_subnetwork', fake_training)
  ctx = _context(cfg, model, mesh, str(tmp_path))
  teacher = method.frozen_teacher(ctx)
  [(name, teacher_cfg, optim)] = calls
  assert name == 'teacher' and teacher_cfg.method.name == 'finetune' and optim.epochs == 3
  assert teacher_cfg.model.to_dict() == cfg.method.teacher_model.to_dict() and teacher_cfg.optim.epochs == 3
  again = method.frozen_teacher(ctx)  # resumed: loaded from <workdir>/teacher, not trained again
  assert len(calls) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, teacher), jax.tree.map(np.asarray, again))


@pytest.fixture(scope='module')
def phase_one(tmp_path_factory):
  """IE-KD's first phase on 32 digits: a teacher checkpoint (its initial values, written as configs/train.py
  writes one) and the teacher autoencoder trained on its features (20 epochs of 2 batches), checkpointed under
  the run's workdir."""
  root = tmp_path_factory.mktemp('iekd')
  cfg, method, model = _iekd_setup(teacher_workdir=str(root / 'teacher'))
  cfg.method.autoencoder_optim.update(epochs=20, batch_size=16)
  mesh = parallel.make_mesh()
  data = run_lib.prepare_data(cfg)
  teacher = train_lib.init_train_state(method.networks['teacher'], mesh, train_lib.make_optimizer(cfg.optim))
  method_store.save_network(cfg.method.teacher_workdir, teacher, train_cfg.get_config('test'), data.scenario.order,
                           10)
  ds = data.dataset
  ctx = dataclasses.replace(_context(cfg, model, mesh, str(root / 'run')), train_images=ds.train_images[:32],
                            train_labels=data.train_labels[:32],
                            augment_fn=augment.make_augment_fn(cfg.data.augment, ds.mean, ds.std))
  ctx = KD.before_task(method, ctx)  # the teacher, loaded from its workdir
  autoencoder = method.teacher_autoencoder(ctx)
  return types.SimpleNamespace(root=root, cfg=cfg, method=method, model=model, mesh=mesh, data=data,
                               teacher=ctx.frozen['teacher'], autoencoder=autoencoder)


def test_teacher_autoencoder_training_lowers_the_reconstruction_error(phase_one):
  p = phase_one
  ds = p.data.dataset
  images = augment.normalize(jnp.asarray(ds.train_images[:32]), ds.mean, ds.std)
  feature = p.method.networks['teacher'].apply(p.teacher['params'], p.teacher['batch_stats'], images)[0]['stages'][-1]

  def error(ae):
    out = p.method.networks['autoencoder'].apply(ae['params'], ae['batch_stats'], feature, train=True)[0]
    return float(L.reconstruction_loss(out['reconstruction'], feature, 'l1').mean())

  initial = dict(zip(('params', 'batch_stats'), p.method.networks['autoencoder'].init_variables()))
  assert error(p.autoencoder) < 0.75 * error(initial)
  ckpt = incremental_jax.checkpoint.RunCheckpointer(os.path.join(p.root, 'run', 'teacher_autoencoder', 'checkpoints'))
  assert ckpt.latest_step() == 40  # 20 epochs of 2 batches
  ckpt.close()


@pytest.mark.slow
def test_iekd_run_keeps_teacher_frozen_and_does_not_train_it_twice(phase_one, tmp_path, monkeypatch):
  p = phase_one
  cfg = p.cfg.copy_and_resolve_references()
  cfg.method.split = 'random'
  workdir = str(tmp_path / 'run')
  shutil.copytree(os.path.join(p.root, 'run', iekd_lib.AUTOENCODER), os.path.join(workdir, iekd_lib.AUTOENCODER))

  def no_training(*args, **kw):
    raise AssertionError('the teacher or its autoencoder was trained again')

  monkeypatch.setattr(TaskContext, 'train_subnetwork', no_training)  # resumed: both are loaded
  results = incremental_jax.train_and_evaluate(cfg, workdir)
  assert results['complete'] and results['num_tasks'] == 1
  assert np.isfinite(results['steps'][0]['epoch_losses']['train']).all()
  method = build_method(cfg, 10, (8, 8, 1))
  model = method.model
  ckpt = incremental_jax.checkpoint.RunCheckpointer(os.path.join(workdir, 'checkpoints'))
  initial = train_lib.init_train_state(model, p.mesh, train_lib.make_optimizer(cfg.optim))
  final, frozen, _, _ = ckpt.restore(ckpt.latest_step(), initial, p.mesh)
  ckpt.close()
  # trained: the student's backbone, head and both encoders (sized by the split), nothing of the teacher
  assert set(final.params) == {'backbone', 'head', 'inherit_encoder', 'explore_encoder'}
  assert final.params['inherit_encoder']['conv0']['kernel'].shape[2] == 8  # 16 last-stage channels / 2
  for part in ('inherit_encoder', 'explore_encoder'):
    assert not np.allclose(initial.params[part]['conv0']['kernel'], final.params[part]['conv0']['kernel'])
  # the teacher and its autoencoder after the student's training are exactly what they were before it
  assert set(frozen) == {'teacher', 'autoencoder'}
  for saved, used in ((p.teacher, frozen['teacher']), (p.autoencoder, frozen['autoencoder'])):
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, saved), jax.tree.map(np.asarray, used))
