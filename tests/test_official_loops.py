"""Step-by-step equality with the official codes' training loops: PODNet (arthurdouillard/incremental_learning.
pytorch), LUCIR (hshustc/CVPR19_Incremental_Learning) and iCaRL (G-U-N/PyCIL), each recorded once with PyTorch by
`tools/record_official_loops.py` into `tests/fixtures/official_loops/<method>.npz` (no PyTorch here).

Each fixture holds two tasks of a tiny class-incremental run (3 classes, then 2 new ones plus 3 exemplars of each
old class, with distillation from the frozen task-0 network), 3 epochs of batch 8 each: every epoch ends with a
partial batch (6 and 5 real examples), the learning rate changes between epochs, the optimiser restarts at the
task boundary. Here the method is built from its own preset (only the network's size and the recording's epochs,
milestones, learning rate and batch size changed; the schedule's placement `optim.schedule_offset` and
`data.drop_last` are the presets'), its initial weights are the official network's, and both tasks are trained by
the library's own loop (`train.run_phase`: the sampler, steps per epoch, the padded last batch and its weights,
the schedule, the optimiser reset), with the method's own phases, losses and hooks (`phases`, `after_task`).
Replayed rather than redone: each epoch's permutation (the sampler's `rng.permutation`), each image's crop and
flip (the images enter augmented and the augmentation only normalises), and the classifier rows the official code
sets up for task 1 (imprinting or a fresh layer). Task 1 starts from the official state after task 0 (teacher and
network), so that the rounding of one task does not compound into the next. Asserted: the number of steps, the
loss and learning rate of every step, and every parameter and BatchNorm statistic after each task.

PyCIL's KD term is the soft cross-entropy, not the KL divergence the library computes: they differ by the teacher's
entropy, a constant of each step that the fixture records (`loss_offset`) and that is subtracted here.
"""
from __future__ import annotations

import importlib
import json
import pathlib
import re
import sys

import jax
import numpy as np
import pytest

from incremental_jax import parallel, train
from incremental_jax.data import augment as augment_lib
from incremental_jax.data import pipeline
from incremental_jax.data.scenario import Scenario
from incremental_jax.memory import Memory
from incremental_jax.methods import METHODS
from incremental_jax.methods.base import TaskContext
from incremental_jax.task_stages import phase_task_info

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / 'tests' / 'fixtures' / 'official_loops'
sys.path.insert(0, str(ROOT / 'tools'))
import record_official_loops as recorder  # noqa: E402  (numpy only at import: the images, their crops and flips)

# Tolerances. The fixture is the official code's float64 trajectory; the library runs in float32, so each step
# carries float32 rounding (1e-7 relative), which 12 SGD steps per task grow to the figures printed by `_report`:
# losses within 1.2e-6, parameters within 4.3e-5 (BatchNorm running variances of about 10; 1e-6 for the other
# tensors). Perturbing the weights by 1e-7 at a task's start moves them about as much (the recording's learning
# rates are chosen for that, `recorder.LRS`). A wrong loop moves losses by 1e-2 or more (the schedule one epoch off,
# the partial batch dropped or its padding counted, no optimiser reset), a running variance taken biased by 2e-3.
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-5
PARAM_RTOL, PARAM_ATOL = 1e-4, 1e-5


# ---- the official state_dicts in this library's layout ------------------------------------------------
def _leaf(kind: str, name: str, value: np.ndarray):
  """(collection, leaf, value) of a torch conv/bn tensor: conv weight OIHW -> kernel HWIO; BatchNorm weight/bias ->
  scale/bias; running_mean/var -> batch statistics mean/var."""
  if kind == 'conv':
    assert name == 'weight', name
    return 'params', 'kernel', value.transpose(2, 3, 1, 0)
  return {'weight': ('params', 'scale', value), 'bias': ('params', 'bias', value),
          'running_mean': ('batch_stats', 'mean', value), 'running_var': ('batch_stats', 'var', value)}[name]


# torch name pattern -> (our module path, 'conv' or 'bn'); groups: stage, block, a/b or 1/2, leaf.
BACKBONES = {
    'podnet': [(r'convnet\.conv_1_3x3\.(\w+)', lambda m: (('stem_conv',), 'conv')),
               (r'convnet\.bn_1\.(\w+)', lambda m: (('stem_bn',), 'bn')),
               (r'convnet\.stage_([123])\.blocks\.(\d+)\.(conv|bn)_(a|b)\.(\w+)',
                lambda m: ((f'stage{int(m[1]) - 1}_block{m[2]}', f"{m[3]}{'1' if m[4] == 'a' else '2'}"), m[3])),
               (r'convnet\.stage_4\.(conv|bn)_(a|b)\.(\w+)',
                lambda m: (('stage3_block0', f"{m[1]}{'1' if m[2] == 'a' else '2'}"), m[1]))],
    'lucir': [(r'conv1\.(\w+)', lambda m: (('stem_conv',), 'conv')),
              (r'bn1\.(\w+)', lambda m: (('stem_bn',), 'bn')),
              (r'layer(\d)\.(\d+)\.(conv|bn)([12])\.(\w+)',
               lambda m: ((f'stage{int(m[1]) - 1}_block{m[2]}', f'{m[3]}{m[4]}'), m[3])),
              (r'layer(\d)\.(\d+)\.downsample\.([01])\.(\w+)',
               lambda m: ((f'stage{int(m[1]) - 1}_block{m[2]}', 'shortcut', 'conv' if m[3] == '0' else 'bn'),
                          'conv' if m[3] == '0' else 'bn'))],
    'icarl': [(r'convnet\.conv_1_3x3\.(\w+)', lambda m: (('stem_conv',), 'conv')),
              (r'convnet\.bn_1\.(\w+)', lambda m: (('stem_bn',), 'bn')),
              (r'convnet\.stage_(\d)\.(\d+)\.(conv|bn)_(a|b)\.(\w+)',
               lambda m: ((f'stage{int(m[1]) - 1}_block{m[2]}', f"{m[3]}{'1' if m[4] == 'a' else '2'}"), m[3]))],
}
HEAD_PREFIXES = ('classifier.', 'post_processor.', 'fc.')
UNUSED = ('convnet.fc.',)   # PyCIL's CifarResNet builds an nn.Linear its forward pass never uses


def backbone_entries(method: str, sd: dict) -> list:
  """[(collection, path, value)] of the backbone tensors of a torch state_dict, in this library's layout."""
  out = []
  for name, value in sd.items():
    if name.startswith(HEAD_PREFIXES + UNUSED):
      continue
    for pattern, where in BACKBONES[method]:
      m = re.fullmatch(pattern, name)
      if m:
        module, kind = where(m)
        collection, leaf, v = _leaf(kind, m.groups()[-1], value)
        out.append((collection, ('backbone',) + module + (leaf,), v))
        break
    else:
      raise KeyError(f'{method}: no mapping for {name}')
  return out


def head_rows(method: str, sd: dict, proxies: int) -> tuple[dict, dict]:
  """The classifier of a torch state_dict: ({leaf: rows [C_seen, ...] with the class axis first}, {leaf: scalar}).
  PODNet: proxies `classifier._weights.<task>` [C*K, D] (K = `proxies`) -> kernel [D, C, K], scale
  `post_processor.factor` -> eta; LUCIR: `fc.weight` (or `fc.fc1.weight` + `fc.fc2.weight`) [C, D] -> kernel
  [D, C], `fc.sigma` -> sigma; PyCIL: `fc.weight` [C, D], `fc.bias` [C] -> kernel [D, C], bias [C]."""
  if method == 'podnet':
    w = np.concatenate([sd[k] for k in sorted(k for k in sd if k.startswith('classifier._weights.'))])
    return {'kernel': w.reshape(-1, proxies, w.shape[-1]).transpose(0, 2, 1)}, {'eta': sd['post_processor.factor']}
  if method == 'lucir':
    w = sd['fc.weight'] if 'fc.weight' in sd else np.concatenate([sd['fc.fc1.weight'], sd['fc.fc2.weight']])
    return {'kernel': w}, {'sigma': sd['fc.sigma'].reshape(())}
  return {'kernel': sd['fc.weight'], 'bias': sd['fc.bias']}, {}


def _class_axis_first(leaf: str, value: np.ndarray) -> np.ndarray:
  """Our head leaf with its class axis (kernel: 1; bias: 0) moved first."""
  return np.moveaxis(value, 1, 0) if leaf == 'kernel' else value


def _class_axis_back(leaf: str, rows: np.ndarray) -> np.ndarray:
  return np.moveaxis(rows, 0, 1) if leaf == 'kernel' else rows


def with_official(state, method: str, sd: dict, classes: slice, proxies: int, backbone: bool = True):
  """`state` with the official tensors of `sd`: the backbone (when `backbone`), the head's rows of `classes` and
  its scalars; every other head row keeps ours."""
  params, stats = jax.device_get((state.params, state.batch_stats))
  params, stats = jax.tree.map(np.array, params), jax.tree.map(np.array, stats)
  trees = {'params': params, 'batch_stats': stats}
  for collection, path, value in backbone_entries(method, sd) if backbone else []:
    node = trees[collection]
    for key in path[:-1]:
      node = node[key]
    assert node[path[-1]].shape == value.shape, (path, node[path[-1]].shape, value.shape)
    node[path[-1]] = value.astype(np.float32)
  rows, scalars = head_rows(method, sd, proxies)
  for leaf, r in rows.items():
    ours = _class_axis_first(leaf, params['head'][leaf])
    ours[classes] = r[classes]
    params['head'][leaf] = _class_axis_back(leaf, ours)
  for leaf, v in scalars.items():
    params['head'][leaf] = np.asarray(v, np.float32).reshape(())
  mesh = parallel.make_mesh()
  return state.replace(params=parallel.replicate(params, mesh), batch_stats=parallel.replicate(stats, mesh))


def differences(state, method: str, sd: dict, seen: int, proxies: int) -> dict:
  """{name: (max |ours - official|, max |ours - official| / (PARAM_ATOL + PARAM_RTOL |official|))} over every
  backbone tensor and BatchNorm statistic and the head's rows of the `seen` classes and its scalars."""
  params, stats = jax.device_get((state.params, state.batch_stats))
  trees = {'params': params, 'batch_stats': stats}
  pairs = {}
  for collection, path, value in backbone_entries(method, sd):
    node = trees[collection]
    for key in path:
      node = node[key]
    pairs['/'.join((collection,) + path)] = (np.asarray(node), value)
  rows, scalars = head_rows(method, sd, proxies)
  for leaf, r in rows.items():
    pairs[f'params/head/{leaf}'] = (_class_axis_first(leaf, np.asarray(params['head'][leaf]))[:seen], r[:seen])
  for leaf, v in scalars.items():
    pairs[f'params/head/{leaf}'] = (np.asarray(params['head'][leaf]), np.asarray(v).reshape(()))
  return {name: (float(np.abs(a - b).max()), float((np.abs(a - b) / (PARAM_ATOL + PARAM_RTOL * np.abs(b))).max()))
          for name, (a, b) in pairs.items()}


# ---- the replay ---------------------------------------------------------------------------------------
class _ReplayedRng:
  """The sampler's generator of one epoch: its `permutation(n)` is the official DataLoader's."""

  def __init__(self, perm: np.ndarray):
    self.perm = perm

  def permutation(self, n):
    assert n == len(self.perm), (n, len(self.perm))
    return self.perm.copy()


class ReplayTrainer(train.Trainer):
  """The library's `Trainer`, with two things replayed: each epoch's permutation (the sampler itself, with the
  run's `data.sampler` and `data.drop_last`, cuts it into batches), and the images, which are the official run's
  augmented views (epoch e's view of the phase's j-th example is image e * n + j of the phase's view array).
  Every step's loss and learning rate are logged from inside the compiled step."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.replay, self.log = None, []

  def epoch_plan(self, phase, labels, rng_seed):
    perms, examples, base_labels = self.replay
    real = np.random.default_rng
    np.random.default_rng = lambda seed: _ReplayedRng(perms[seed[-1]])
    try:
      plans = super().epoch_plan(phase, base_labels, rng_seed)
    finally:
      np.random.default_rng = real
    position = np.full(int(examples.max()) + 1, -1)
    position[examples] = np.arange(len(examples))
    return [np.where(rows >= 0, e * len(examples) + position[np.maximum(rows, 0)], rows) for e, rows in enumerate(plans)]

  def _step(self, phase, has_teacher, group):
    step = super()._step(phase, has_teacher, group)

    def logged(state, frozen, task, batch):
      new_state, metrics = step(state, frozen, task, batch)
      jax.debug.callback(lambda loss, lr: self.log.append((float(loss), float(lr))), metrics['loss'],
                         metrics['lr'], ordered=True)
      return new_state, metrics

    return logged


def config_of(method: str, meta: dict, overrides: dict):
  """The method's preset (`configs/<method>.py`, CIFAR-100 B50) at the recording's sizes: network depth and
  width, 3 proxies per class (PODNet), epochs, milestones and batch size; augmentation only normalises (the
  images come augmented); `overrides` {'section.field': value} last."""
  config = importlib.import_module(f'configs.{method}').get_config()
  config.model.depth, config.model.width = int(meta['depth']), int(meta['width'])
  config.optim.epochs, config.optim.batch_size = int(meta['epochs']), int(meta['batch_size'])
  config.optim.lr = float(meta['lr'])
  if method == 'podnet':
    config.model.head_kwargs.proxies_per_class = int(meta['proxies_per_class'])
  if method == 'lucir':
    config.optim.milestones = tuple(meta['milestones'])
  if method == 'icarl':
    config.optim.milestones = tuple(meta['milestones'])
    config.optim.first_task_milestones = tuple(meta['first_task_milestones'])
    config.optim.first_task_epochs = 0
  config.data.augment.update(crop_padding=0, flip=False, brightness=0.0)
  config.progress = False
  for key, value in overrides.items():
    section, field = key.rsplit('.', 1)
    setattr(_section(config, section), field, value)
  return config


def _section(config, dotted: str):
  for part in dotted.split('.'):
    config = config[part]
  return config


def replay(method: str, overrides: dict | None = None) -> list:
  """Trains the method's two tasks on the fixture; returns per task the logged (loss, lr) per step and the
  parameter differences after it, with the recorded values."""
  z = np.load(FIXTURES / f'{method}.npz')
  meta = json.loads(str(z['meta']))
  config = config_of(method, meta, overrides or {})
  k = int(meta.get('proxies_per_class', 1))
  images, labels = recorder.make_data(int(meta['data_seed']))[0], z['labels'].astype(np.int32)
  assert recorder.images_digest(images) == meta['images_sha256'], 'the synthetic images are not the recorded ones'
  num_old, num_new = int(meta['num_old']), int(meta['num_new'])
  np.testing.assert_allclose(config.data.mean, meta['mean'])   # the preset's normalisation is the official one
  np.testing.assert_allclose(config.data.std, meta['std'])
  scenario = Scenario(order=np.arange(num_old + num_new), sizes=(num_old, num_new))
  m = METHODS[method](config, scenario.num_classes, images.shape[1:])
  mesh = parallel.make_mesh()
  trainer = ReplayTrainer(m.model, m, mesh, augment_lib.make_augment_fn(config.data.augment, config.data.mean,
                                                                        config.data.std), show_progress=False)
  state = train.init_train_state(m.model, mesh, train.make_optimizer(config.optim))
  state = with_official(state, method, _weights(z, 'init'), slice(0, num_old), k)
  memory = Memory({c: np.flatnonzero(labels == c)[:recorder.EXEMPLARS] for c in range(num_old)})
  ctx = TaskContext(config=config, task=0, scenario=scenario, train_images=images, train_labels=labels,
                    model=m.model, state=state, frozen=None, method_state={}, memory=Memory(), embed=None,
                    predict=None, mesh=mesh)
  results = []
  for t in (0, 1):
    if t == 1:   # the classifier rows the official code set up for the new classes
      ctx = ctx.replace(task=1, memory=memory, state=with_official(
          ctx.state, method, _weights(z, 'task1_head'), slice(num_old, num_old + num_new), k, backbone=False))
    phase = m.phases(ctx)[0]
    examples = z[f'task{t}/examples']
    np.testing.assert_array_equal(phase.indices, examples)   # new classes then exemplars, as the official codes
    perms, crops, flips = z[f'task{t}/perm'], z[f'task{t}/crop'], z[f'task{t}/flip']
    views = np.concatenate([recorder.augment(images[examples], crops[e], flips[e]) for e in range(len(perms))])
    trainer.replay, trainer.log = (perms, examples, labels), []
    run = train.PhaseRun(state=ctx.state, frozen=ctx.frozen, task=phase_task_info(m, ctx, phase), phase=phase,
                         labels=np.tile(labels[examples], len(perms)), rng_seed=(t,), seed=0)
    (result,) = train.run_phase(trainer, [run], pipeline.DeviceImages(views, mesh))
    end = _weights(z, f'task{t}_end')
    results.append({'log': np.array(trainer.log), 'loss': z[f'task{t}/loss'] - z[f'task{t}/loss_offset'],
                    'lr': z[f'task{t}/lr'], 'params': differences(result.state, method, end, scenario.task_end(t), k)})
    # The next task starts from the official state (its float32 drift asserted above): its teacher and network are
    # the official ones, so that one task's rounding does not compound into the next's.
    ctx = m.after_task(ctx.replace(state=with_official(result.state, method, end, slice(0, scenario.task_end(t)), k)))
  return results


def _weights(z, stage: str) -> dict:
  prefix = f'w/{stage}/'
  return {k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)}


def _report(method: str, results: list) -> str:
  lines = []
  for t, r in enumerate(results):
    n = min(len(r['log']), len(r['loss']))
    loss_diff = np.abs(r['log'][:n, 0] - r['loss'][:n]).max() if n else float('nan')
    worst = max(r['params'], key=lambda k: r['params'][k][0])
    lines.append(f"{method} task {t}: {len(r['log'])} steps (official {len(r['loss'])}), max |loss diff| "
                 f"{loss_diff:.2e}, max |param diff| {r['params'][worst][0]:.2e} ({worst}), max param diff / "
                 f"tolerance {max(v[1] for v in r['params'].values()):.2f}")
  return '\n'.join(lines)


def mismatches(results: list) -> list:
  """What differs from the official run, per task: the step count, a learning rate, a loss, a parameter."""
  found = []
  for t, r in enumerate(results):
    if len(r['log']) != len(r['loss']):
      found.append(f"task {t}: {len(r['log'])} steps, the official loop took {len(r['loss'])}")
      continue
    if not np.allclose(r['log'][:, 1], r['lr'], rtol=1e-6, atol=0):
      found.append(f"task {t}: learning rates {r['log'][:, 1]} instead of {r['lr']}")
    if not np.allclose(r['log'][:, 0], r['loss'], rtol=LOSS_RTOL, atol=LOSS_ATOL):
      found.append(f"task {t}: losses {np.round(r['log'][:, 0], 6)} instead of {np.round(r['loss'], 6)}")
    bad = {k: f'{v[0]:.2e}' for k, v in r['params'].items() if not v[1] <= 1.0}
    if bad:
      found.append(f'task {t}: parameters after the task beyond atol {PARAM_ATOL} + rtol {PARAM_RTOL}: {bad}')
  return found


@pytest.mark.slow
@pytest.mark.parametrize('method', ['podnet', 'lucir', 'icarl'])
def test_training_loop_matches_the_official_code_step_by_step(method):
  results = replay(method)
  print(_report(method, results))
  assert not mismatches(results), '\n'.join(mismatches(results))


@pytest.mark.slow
@pytest.mark.parametrize('method, change, what', [
    ('podnet', {'optim.schedule_offset': 0}, 'learning rates'),   # the cosine one epoch early
    ('lucir', {'data.drop_last': True}, 'steps'),                 # the partial batch dropped
    ('icarl', {'model.bn_running_var': 'biased'}, 'parameters'),  # flax's running variance
])
def test_the_replay_tells_a_loop_change(method, change, what):
  """The fixtures have the power to tell: PODNet's schedule without its one-epoch lag, LUCIR's epochs without
  their last partial batch, iCaRL with flax's BatchNorm update no longer match (checked by hand for every method,
  and also for the padding counted as examples, BatchNorm statistics over the padding and no optimiser reset)."""
  found = mismatches(replay(method, change))
  assert any(what in f for f in found), found
