"""Several runs trained together (`num_runs`): each run equals the same config run alone."""
import json
import os

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

import incremental_jax
from incremental_jax import config as cfglib, parallel, runs, train
from configs import icarl
from incremental_jax.data import augment
from incremental_jax.methods.base import Phase
from incremental_jax.methods.baselines import Finetune
from incremental_jax.models import build_model
from incremental_jax.validate import ConfigError


def _test_config(**kw):
  from configs import lucir
  c = lucir.get_config('test')
  for k, v in kw.items():
    c[k] = v
  return c


def test_run_configs_vary_seed_and_class_order():
  c = _test_config(num_runs=3)
  got = [(r.seed, r.data.class_order_seed, r.num_runs) for r in runs.run_configs(c)]
  assert got == [(0, 1993, 1), (1, 1994, 1), (2, 1995, 1)]
  c.runs_vary = 'seed'
  assert [(r.seed, r.data.class_order_seed) for r in runs.run_configs(c)] == [(0, 1993), (1, 1993), (2, 1993)]
  c.runs_vary = 'order'
  assert [(r.seed, r.data.class_order_seed) for r in runs.run_configs(c)] == [(0, 1993), (0, 1994), (0, 1995)]


def test_run_configs_walk_the_published_orders():
  c = _test_config(num_runs=3)
  c.runs_vary, c.data.named_order = 'order', 'podnet_cifar100:0'
  assert [(r.seed, r.data.named_order) for r in runs.run_configs(c)] == [(0, f'podnet_cifar100:{k}') for k in range(3)]
  c.runs_vary = 'seed'                       # the order stays; only the seed moves
  assert {r.data.named_order for r in runs.run_configs(c)} == {'podnet_cifar100:0'}
  c.runs_vary, c.num_runs = 'order', 4       # PODNet publishes three CIFAR-100 orders
  with pytest.raises(ConfigError, match='num_runs'):
    runs.run_configs(c)


@pytest.mark.parametrize('edit,match', [
    (dict(runs_vary='orders'), 'runs_vary'),
    (dict(num_runs=0), 'num_runs'),
    (dict(data_class_order=tuple(range(10))), 'class_order'),
])
def test_run_configs_refuse_bad_fields(edit, match):
  c = _test_config(num_runs=2)
  for k, v in edit.items():
    if k == 'data_class_order':
      c.data.class_order = v
    else:
      c[k] = v
  with pytest.raises(ConfigError, match=match):
    runs.run_configs(c)


def _phase_setup():
  config = cfglib.test_preset(cfglib.base_config())
  config.method.name = 'finetune'
  model = build_model(config.model, 4, (8, 8, 1), seed=0)
  method = Finetune(config, 4, (8, 8, 1))
  mesh = parallel.make_mesh()
  aug = augment.make_augment_fn(config.data.augment, (0.5,), (0.25,))
  trainer = train.Trainer(model, method, mesh, aug, show_progress=False)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (120, 8, 8, 1)).astype(np.uint8)
  labels = [rng.integers(0, 4, 120), rng.integers(0, 4, 120)]
  optim = ConfigDict(dict(config.optim, epochs=2, batch_size=16, lr=0.05))
  phases = [Phase('train', method.loss, np.arange(48), optim), Phase('train', method.loss, np.arange(40, 120), optim)]
  return config, model, trainer, images, labels, phases, mesh


def test_group_phase_equals_each_run_alone_with_uneven_steps():
  """Run 0 has 3 steps per epoch, run 1 has 5: the group pads run 0 with discarded steps; each run's state
  and per-epoch losses equal those of `run_phase` on that run alone (own labels, seed and sampler seed)."""
  config, model, trainer, images, labels, phases, mesh = _phase_setup()
  tasks = [train.make_task_info(type('S', (), {'class_masks': lambda self, t: {
      'old': np.zeros(4, np.float32), 'new': np.ones(4, np.float32), 'seen': np.ones(4, np.float32)}})(), 0,
      np.ones(4, np.float32)) for _ in range(2)]
  seeds = [3, 7]
  init = [train.init_train_state(build_model(config.model, 4, (8, 8, 1), seed=s), mesh,
                                 train.make_optimizer(config.optim)) for s in seeds]
  group = train.run_phase(trainer, [train.PhaseRun(state, None, task, phase, lab, (s, 0, 0), s)
                                     for state, task, phase, lab, s in zip(init, tasks, phases, labels, seeds)], images)
  for k, s in enumerate(seeds):
    solo_trainer = train.Trainer(model, trainer.method, mesh, trainer.augment_fn, show_progress=False)
    fresh = train.init_train_state(build_model(config.model, 4, (8, 8, 1), seed=s), mesh,
                                   train.make_optimizer(config.optim))
    (solo,) = train.run_phase(solo_trainer, [train.PhaseRun(fresh, None, tasks[k], phases[k], labels[k], (s, 0, 0), s)],
                              images)
    assert int(group[k].state.step) == int(solo.state.step) == [3, 5][k] * 2
    for a, b in zip(jax.tree.leaves(group[k].state.params), jax.tree.leaves(solo.state.params)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([m['loss'] for m in group[k].epoch_metrics], [m['loss'] for m in solo.epoch_metrics],
                               rtol=1e-5)
  assert trainer.compile_count == 1


def test_two_runs_together_equal_each_run_alone(tmp_path):
  """A LUCIR group of 2 (teacher, imprinting, herding, NME): run 1's results.json equals the run of seed 1 and
  class order seed 1994 alone; the summary's mean and std are those of the two runs.

  The vmapped step batches the two runs' convolutions and reductions, so it agrees with the solo step only to
  float rounding (about 1e-6 on the first losses). At the test preset's lr 0.05 this tiny network is chaotic
  enough to amplify that into accuracy differences of a few points by the third task, so the comparison runs at
  lr 0.01, where the two agree to every printed digit: accuracies are compared to 1 point (about two test
  images) and per-epoch losses to 1e-4, far below what a wrong seed, class order, teacher or memory gives."""
  summary = incremental_jax.train_and_evaluate(_stable(_test_config(num_runs=2)), str(tmp_path / 'group'))
  solo_cfg = _stable(_test_config(seed=1))
  solo_cfg.data.class_order_seed = 1994
  solo = incremental_jax.train_and_evaluate(solo_cfg, str(tmp_path / 'solo'))
  with open(tmp_path / 'group' / 'run_0' / 'results.json') as f:
    first = json.load(f)
  with open(tmp_path / 'group' / 'run_1' / 'results.json') as f:
    grouped = json.load(f)
  assert grouped['class_order'] == solo['class_order'] != first['class_order']
  assert len(grouped['steps']) == len(solo['steps']) == 3
  for a, b in zip(grouped['steps'], solo['steps']):
    assert a['memory_size'] == b['memory_size']
    for kind in ('cnn', 'nme'):
      assert a[kind].keys() == b[kind].keys()
      for part in ('all', 'old', 'new'):
        if b[kind].get(part) is not None:
          assert abs(a[kind][part] - b[kind][part]) <= 1.0, (kind, part, a[kind][part], b[kind][part])
    np.testing.assert_allclose(a['epoch_losses']['train'], b['epoch_losses']['train'], rtol=1e-4)
  # The two runs of the group really differ (their own seed and class order), by much more than the tolerance.
  assert abs(first['steps'][0]['epoch_losses']['train'][0] - grouped['steps'][0]['epoch_losses']['train'][0]) > 1e-2
  both = [first['avg_incremental_accuracy']['cnn'], grouped['avg_incremental_accuracy']['cnn']]
  assert summary['avg_incremental_accuracy']['cnn']['mean'] == pytest.approx(np.mean(both))
  assert summary['avg_incremental_accuracy']['cnn']['std'] == pytest.approx(np.std(both))
  assert summary['compilations'] == 2           # LUCIR: the first task's step (no teacher) and the later one
  assert os.path.exists(tmp_path / 'group' / 'summary.json')


def _stable(c):
  """A learning rate at which float rounding is not amplified over the test's few steps (the group and solo steps
  differ only in how vmap batches them; their convolutions are XLA's plain ones, below the CPU lowering's size)."""
  c.optim.lr = 0.01
  return c


def _without_timings(results: dict) -> dict:
  return {**{k: v for k, v in results.items() if k != 'steps'},
          'steps': [{k: v for k, v in s.items() if k != 'train_seconds'} for s in results['steps']]}


@pytest.mark.slow
def test_group_killed_inside_a_task_resumes_to_the_uninterrupted_group(tmp_path):
  """A 2-run iCaRL group with a checkpoint every epoch, SIGKILLed inside step 2 when run 0 has its mid-task
  checkpoint of step 2 and run 1 has none (killed as run 0 starts its task-end write, the 11th checkpoint write:
  each run writes a mid-task and a task-end checkpoint per step; run 1's mid-task one is removed, as a kill
  between the two runs' writes leaves it). Run 0 resumes inside step 2 after epoch 1, run 1 from the end of
  step 1, trained together again; both runs' results equal the uninterrupted group's."""
  import shutil
  import subprocess
  import sys
  from incremental_jax import faults
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  flags = ['--config.num_runs=2', '--config.checkpoint.every_epochs=1', '--config.progress=True']
  config = icarl.get_config('test')
  config.num_runs, config.checkpoint.every_epochs = 2, 1
  reference = incremental_jax.train_and_evaluate(config, str(tmp_path / 'reference'))
  workdir = tmp_path / 'run'
  cmd = [sys.executable, 'main.py', '--config=configs/icarl.py:test', f'--workdir={workdir}', *flags]
  env = {**os.environ, faults.ENV_VAR: 'checkpoint_write:11'}
  out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == -9, out.stderr[-3000:]

  def complete(k):
    ckpts = workdir / f'run_{k}' / 'checkpoints'
    steps = sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())
    return ckpts, [(s, json.loads((ckpts / str(s) / 'meta' / 'metadata').read_text())) for s in steps]

  ckpts, run1 = complete(1)
  for step, meta in run1:
    if 'mid_task' in meta:
      shutil.rmtree(ckpts / str(step))
  _, run0 = complete(0)
  assert run0[-1][1]['mid_task']['task'] == 2 and run0[-1][1]['mid_task']['epoch'] == 1   # run 0: inside step 2
  assert 'mid_task' not in complete(1)[1][-1][1] and complete(1)[1][-1][1]['task'] == 1     # run 1: end of step 1
  env.pop(faults.ENV_VAR)
  out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'step 2/2 train (2 runs)' in out.stderr   # the resumed step trained both runs together
  for k in range(2):
    resumed = json.loads((workdir / f'run_{k}' / 'results.json').read_text())
    ref = json.loads((tmp_path / 'reference' / f'run_{k}' / 'results.json').read_text())
    assert _without_timings(resumed)['steps'] == _without_timings(ref)['steps']
  assert reference['num_runs'] == 2
