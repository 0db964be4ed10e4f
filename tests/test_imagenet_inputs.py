"""A tiny ImageNet-style run (generated JPEGs, 4 classes in 2 tasks, ResNet-18 width 8) with the official train
transforms (RandomResizedCrop on the host through the Grain loader, flip and multiplicative brightness on the
device) is SIGKILLed mid-epoch and resumes to the results of an uninterrupted run; the killed run decodes in a
worker process, the reference in the training process. Bad input settings fail before training."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from incremental_jax import faults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ('train_seconds', 'compilations')


def _folder(root):
  rng = np.random.default_rng(0)
  for split, n in (('train', 6), ('val', 2)):
    for c in range(4):
      d = os.path.join(root, split, f'n0{c}')
      os.makedirs(d)
      for i in range(n):
        h, w = rng.integers(36, 60, 2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(d, f'{i}.JPEG'))
  return root


def _run(data_dir, workdir, workers, fault=None, *extra, tmpdir=None):
  env = {k: v for k, v in os.environ.items() if k != faults.ENV_VAR}
  if tmpdir:
    env['TMPDIR'] = tmpdir   # where the loader's row table lives
  if fault:
    env[faults.ENV_VAR] = fault
  cmd = [sys.executable, 'main.py', '--config=configs/finetune.py:digits', f'--workdir={workdir}',
         '--config.data.name=image_folder', f'--config.data.data_dir={data_dir}', '--config.data.image_size=32',
         '--config.data.resize=36', '--config.data.augment.random_resized_crop=True',
         '--config.data.augment.crop_padding=0', '--config.data.augment.flip=True',
         f'--config.data.augment.brightness={63 / 255}', f'--config.data.workers={workers}',
         '--config.model.backbone=resnet', '--config.model.depth=18', '--config.model.width=8',
         '--config.optim.epochs=2', '--config.optim.batch_size=4', '--config.memory.per_class=2',
         '--config.checkpoint.every_epochs=1', '--config.progress=False', '--config.plots=False', *extra]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  for s in results['steps']:
    for k in TIMING:
      s.pop(k, None)
  # the config differs in data.workers (0 vs 1) only; every result must be the same
  return {k: v for k, v in results.items() if k not in TIMING + ('environment', 'config')}


@pytest.mark.slow
def test_kill_mid_epoch_and_resume_gives_the_uninterrupted_results(tmp_path):
  data = _folder(str(tmp_path / 'data'))
  full = _run(data, str(tmp_path / 'full'), 0)
  assert full.returncode == 0, full.stderr[-3000:]
  # task 0: 12 images, batch 4 -> 3 steps per epoch; the 5th step is in epoch 2, after epoch 1's checkpoint
  loader_tmp = tmp_path / 'loader_tmp'
  loader_tmp.mkdir()
  killed = _run(data, str(tmp_path / 'resumed'), 1, 'train_step:5', tmpdir=str(loader_tmp))
  assert killed.returncode == -9, killed.stderr[-3000:]
  tables = lambda: [n for n in os.listdir(loader_tmp) if n.startswith('incremental_jax_rows_')]
  for _ in range(100):   # the killed run's workers notice, remove their row table and exit
    if not tables():
      break
    time.sleep(0.1)
  assert tables() == []
  assert not os.path.exists(tmp_path / 'resumed' / 'results.json') or not json.load(
      open(tmp_path / 'resumed' / 'results.json'))['steps']
  resumed = _run(data, str(tmp_path / 'resumed'), 1)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'leaked' not in resumed.stderr, resumed.stderr[-3000:]   # the loader's workers stopped cleanly
  assert _results(str(tmp_path / 'resumed')) == _results(str(tmp_path / 'full'))


def test_bad_input_setting_exits_2_before_training(tmp_path):
  cmd = [sys.executable, 'main.py', '--config=configs/finetune.py:digits', f'--workdir={tmp_path / "w"}',
         '--config.data.augment.brightness_mode=times']
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'brightness_mode' in out.stderr.strip().splitlines()[-1]
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


@pytest.mark.parametrize('field, value, message', [
    ('augment.brightness_mode', 'times', 'brightness_mode'),
    ('workers', -2, 'data.workers'),
    ('prefetch', 0, 'data.prefetch'),
    ('augment.crop_scale', (0.5, 0.1), 'crop_scale'),
    ('augment.crop_ratio', (1.0,), 'crop_ratio'),
    ('augment.random_resized_crop', True, 'random_resized_crop'),   # digits: decoded arrays, nothing to crop
    ('classes', 'imagenet100_podnet', 'data.classes'),
])
def test_bad_input_settings_are_config_errors(field, value, message):
  from configs import finetune
  from incremental_jax import validate
  from incremental_jax.errors import ConfigError
  c = finetune.get_config('digits')
  validate.validate_config(c)
  node = c.data
  *path, leaf = field.split('.')
  for p in path:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError, match=message):
    validate.validate_config(c)
  c = finetune.get_config('digits')
  c.data.name, c.data.classes = 'image_folder', 'no_such_list'
  with pytest.raises(ConfigError, match='imagenet100_lucir'):
    validate.validate_config(c)


def test_crop_padding_with_random_resized_crop_is_a_config_error():
  from configs import finetune
  from incremental_jax import validate
  from incremental_jax.errors import ConfigError
  c = finetune.get_config('digits')
  c.data.name, c.data.augment.random_resized_crop, c.data.augment.crop_padding = 'image_folder', True, 0
  validate.validate_config(c)
  c.data.augment.crop_padding = 4   # would be silently ignored: the host cuts the crop
  with pytest.raises(ConfigError, match='crop_padding=4'):
    validate.validate_config(c)
