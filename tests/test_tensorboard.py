"""TensorBoard logging: the event files a run writes hold the numbers of its results.json."""
import json
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from incremental_jax import metrics as metrics_lib


def _scalars(logdir: str) -> dict:
  """{tag: [(step, value), ...]} read back with TensorBoard's own reader."""
  acc = EventAccumulator(logdir, size_guidance={'scalars': 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


def _f32(x) -> float:
  return float(np.float32(x))   # event files hold float32 scalars


def _check_run(workdir: str) -> None:
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  tb = _scalars(os.path.join(workdir, 'tensorboard'))
  steps = results['steps']
  # per task, x = results.json's 0-based step
  for kind in ('cnn', 'nme'):
    for part in ('all', 'old', 'new'):
      expected = [(s['step'], _f32(s[kind][part])) for s in steps if s[kind] and s[kind][part] is not None]
      if expected:
        assert tb[f'{kind}/{part}'] == expected, (kind, part)
    for key in ('avg_incremental_accuracy', 'average_forgetting'):
      if results[key][kind] is None:
        assert f'{key}/{kind}' not in tb
        continue
      points = tb[f'{key}/{kind}']
      assert points[-1] == (steps[-1]['step'], _f32(results[key][kind]))   # the headline number at the last step
      # and at each earlier step the value over the steps so far (forgetting starts at step 1)
      for t, value in points:
        assert value == _f32(metrics_lib.summarize(steps[:t + 1])[key][kind])
  assert [t for t, _ in tb['cnn/all']] == list(range(len(steps)))
  # per epoch: the loss of each phase equals results.json's epoch_losses, at increasing global steps
  for phase in steps[0]['epoch_losses']:
    losses = [loss for s in steps for loss in s['epoch_losses'][phase]]
    points = tb[f'train/{phase}/loss']
    np.testing.assert_allclose([v for _, v in points], losses, atol=2e-6)
    assert all(b > a for (a, _), (b, _) in zip(points, points[1:]))
    assert [t for t, _ in tb[f'lr/{phase}']] == [t for t, _ in points]


def test_single_run_events_equal_results_json(tiny_workdirs):
  _check_run(tiny_workdirs['lucir'])
  tb = _scalars(os.path.join(tiny_workdirs['lucir'], 'tensorboard'))
  # LUCIR's loss terms are logged beside the total: CE, less-forget constraint, margin ranking
  assert {'train/train/ce', 'train/train/lc', 'train/train/mr', 'train/train/loss', 'lr/train'} <= set(tb)
  # the test preset's constant learning rate (no milestones) is logged as is
  with open(os.path.join(tiny_workdirs['lucir'], 'results.json')) as f:
    lr = json.load(f)['config']['optim']['lr']
  np.testing.assert_allclose([v for _, v in tb['lr/train']], lr, rtol=1e-6)
  _check_run(tiny_workdirs['finetune'])


def test_group_writes_one_directory_per_run(tiny_workdirs):
  group = tiny_workdirs['lucir_group']
  assert not os.path.exists(os.path.join(group, 'tensorboard'))
  for k in (0, 1):
    _check_run(os.path.join(group, f'run_{k}'))
  a, b = (_scalars(os.path.join(group, f'run_{k}', 'tensorboard'))['train/train/loss'] for k in (0, 1))
  assert a != b   # each run's own numbers


def test_resumed_logger_rewrites_the_restored_steps(tiny_workdirs, tmp_path):
  """A run resumed after step t writes the evaluations of steps 0..t again (those of a killed process may not have
  reached the disk): here from a finished run's steps, into an empty directory."""
  from configs import lucir
  from incremental_jax import tensorboard
  with open(os.path.join(tiny_workdirs['lucir'], 'results.json')) as f:
    steps = json.load(f)['steps']
  logger = tensorboard.make_logger(lucir.get_config('test'), str(tmp_path))
  logger.log_tasks(steps[:2])
  logger.close()
  tb = _scalars(str(tmp_path / 'tensorboard'))
  assert tb['nme/all'] == [(s['step'], _f32(s['nme']['all'])) for s in steps[:2]]
  assert tb['average_forgetting/cnn'] == [(1, _f32(metrics_lib.summarize(steps[:2])['average_forgetting']['cnn']))]


def test_tensorboard_off(tmp_path):
  from configs import finetune
  import incremental_jax
  cfg = finetune.get_config('test')
  cfg.tensorboard = False
  cfg.optim.epochs = 1
  cfg.data.increment = 6   # two tasks: a short run
  incremental_jax.train_and_evaluate(cfg, str(tmp_path / 'off'))
  assert os.path.exists(tmp_path / 'off' / 'results.json')
  assert not os.path.exists(tmp_path / 'off' / 'tensorboard')


def test_heavy_libraries_are_imported_only_when_used():
  """Importing the run machinery (and asking whether tensorboardX is there) loads none of tensorboardX,
  matplotlib, scikit-learn, tensorflow_datasets or gcsfs: each is imported where it is first used."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ('import sys, incremental_jax.run, incremental_jax.report, incremental_jax.data.cifar, '
          'incremental_jax.data.image_folder, incremental_jax.methods\n'
          'from incremental_jax import tensorboard\n'
          'assert tensorboard.available()\n'
          "heavy = ('tensorboardX', 'matplotlib', 'sklearn', 'tensorflow_datasets', 'gcsfs')\n"
          "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))")
  out = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=root))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == '[]'


def test_writer_does_not_import_torch(tmp_path):
  """A run's TensorBoard logger writes its scalars without importing PyTorch, even where torch is installed
  (tensorboardX's writer imports it when it can; it costs a run seconds and hundreds of MB). Checked in a fresh
  interpreter whose `torch` is a stand-in that fails loudly when imported; `import torch` afterwards still works."""
  import subprocess
  import sys
  fake = tmp_path / 'site'
  (fake / 'torch').mkdir(parents=True)
  (fake / 'torch' / '__init__.py').write_text("import os\nif not os.environ.get('TORCH_OK'):\n"
                                              "  raise RuntimeError('torch imported')\n")
  logdir = tmp_path / 'tb'
  code = ('import os, sys\n'
          'from incremental_jax.tensorboard import TensorBoardLogger\n'
          f'logger = TensorBoardLogger({str(logdir)!r})\n'
          "logger.log_phase(0, 'train', [{'loss': 1.5, 'lr': 0.1}, {'loss': 0.5, 'lr': 0.1}], 0, 20)\n"
          'logger.close()\n'
          "assert 'torch' not in sys.modules, 'torch was imported'\n"
          "os.environ['TORCH_OK'] = '1'\n"
          'import torch\n'
          f"print('ok', torch.__file__.startswith({str(fake)!r}))")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), root])))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ['ok', 'True']
  assert _scalars(str(logdir))['train/train/loss'] == [(10, 1.5), (20, 0.5)]
