"""Bad input gets one clear error before any training: each case of the README's table, checked through
`train_and_evaluate` (nothing is trained, no checkpoint is written) and, for one case, through `main.py`."""
import dataclasses
import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import incremental_jax
from configs import icarl
from incremental_jax import train as train_lib
from incremental_jax.data import scenario as scenario_lib
from incremental_jax.data import sources
from incremental_jax.validate import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _set(**fields):
  def edit(c):
    for key, value in fields.items():
      node = c
      *path, leaf = key.split('__')
      for p in path:
        node = node[p]
      node[leaf] = value
  return edit


def _digits_with(edit_labels):
  """A data source: the digits with the train labels edited by `edit_labels(labels) -> (keep_mask, labels)`."""
  def load(cfg):
    ds = sources.load_digits(cfg)
    keep, labels = edit_labels(ds.train_labels.copy())
    return dataclasses.replace(ds, train_images=ds.train_images[keep], train_labels=labels[keep])
  return load


def _label_out_of_range(labels):
  labels[5] = 10
  return np.ones(len(labels), bool), labels


def _empty_class(labels):
  return labels != 3, labels


# (case, config edit, custom data source or None, device count or None, error type, message pattern)
CASES = [
    ('unknown method', _set(method__name='icarll'), None, None, ConfigError,
     r"method.name='icarll' is not a method; valid names: \[.*'icarl'"),
    ('unknown data set', _set(data__name='cifar1000'), None, None, ConfigError,
     r"data.name='cifar1000' is not a data set; valid names: \[.*'cifar100'"),
    ('increment does not divide the classes', _set(data__increment=4), None, None, scenario_lib.ScenarioError,
     r'remaining 6 classes are not a multiple of 4. Choose an increment dividing 6'),
    ('negative memory per class', _set(memory__per_class=-1), None, None, ConfigError,
     r'memory.per_class must be >= 0; got -1'),
    ('negative memory total', _set(memory__total=-20), None, None, ConfigError, r'memory.total must be >= 0; got -20'),
    ('memory smaller than the classes', _set(memory__total=6, memory__per_class=0), None, None, ConfigError,
     r'memory.total=6 is smaller than the 10 classes'),
    ('two memory budgets', _set(memory__total=100), None, None, ConfigError,
     r'memory.per_class=3 and memory.total=100 are both set'),
    ('class order not a permutation', _set(data__class_order=(0, 1, 2, 3, 4, 5, 6, 7, 8, 8)), None, None,
     scenario_lib.ScenarioError, r'class_order must be a permutation of 0..9'),
    ('class order too short', _set(data__class_order=(3, 1, 2)), None, None, scenario_lib.ScenarioError,
     r'class_order must be a permutation of 0..9; got \[3, 1, 2\] \(3 entries\)'),
    ('labels out of range', _set(), _digits_with(_label_out_of_range), None, sources.DataError,
     r'train labels must lie in \[0, 10\); found \[10\]'),
    ('a class without images', _set(), _digits_with(_empty_class), None, sources.DataError,
     r"class\(es\) \['3'\] have no train images"),
    ('batch size not divisible by the devices', _set(optim__batch_size=32), None, 3, ConfigError,
     r'optim.batch_size=32 is not divisible by the 3 devices; use a multiple of 3'),
    ('infinite learning rate', _set(optim__lr=float('inf')), None, None, ConfigError,
     r'optim.lr must be a finite number > 0; got inf'),
    ('negative checkpoint interval', _set(checkpoint__every_epochs=-1), None, None, ConfigError,
     r'checkpoint.every_epochs must be >= 0; got -1'),
    ('schedule offset out of range', _set(optim__schedule_offset=2), None, None, ConfigError,
     r'optim.schedule_offset must be -1, 0 or 1 .*; got 2'),
]


@pytest.mark.parametrize('case,edit,source,devices,error,pattern', CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_before_training(tmp_path, monkeypatch, case, edit, source, devices, error,
                                                      pattern):
  c = icarl.get_config('test')
  if source is not None:
    monkeypatch.setattr(sources, 'SOURCES', sources.SOURCES.with_entries(digits=source))
  if devices is not None:
    monkeypatch.setattr(jax, 'device_count', lambda *a: devices)

  def no_training(*args, **kwargs):
    raise AssertionError('training started')

  monkeypatch.setattr(train_lib, 'phase_epochs', no_training)
  edit(c)
  with pytest.raises(error, match=pattern):
    incremental_jax.train_and_evaluate(c, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints') or not os.listdir(tmp_path / 'run' / 'checkpoints')


def test_main_prints_one_line_and_exits_2(tmp_path):
  out = subprocess.run([sys.executable, 'main.py', '--config=configs/icarl.py:test', f'--workdir={tmp_path}/run',
                        '--config.data.name=cifar1000'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  errors = [line for line in out.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and "data.name='cifar1000' is not a data set" in errors[0]
  assert 'Traceback' not in out.stderr


# ---- image folders (the loader lives in incremental_jax.data.image_folder) ---------------------------------
needs_image_folder = pytest.mark.skipif(importlib.util.find_spec('incremental_jax.data.image_folder') is None,
                                        reason='incremental_jax.data.image_folder (the image-folder loader) is not '
                                               'on this branch')


def _image_tree(root, classes=('ant', 'bee', 'cat'), per_class=2):
  from PIL import Image
  rng = np.random.default_rng(0)
  for split in ('train', 'val'):
    for name in classes:
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      for i in range(per_class):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
            os.path.join(root, split, name, f'{i}.png'))


def _folder_config(root):
  c = icarl.get_config('test')
  c.data.name = 'image_folder'
  c.data.data_dir = str(root)
  c.data.image_size = 8
  c.data.resize = 8
  c.data.initial_classes = 0
  c.data.increment = 1
  c.memory.per_class = 1
  return c


@needs_image_folder
def test_image_folder_with_an_empty_class(tmp_path, monkeypatch):
  _image_tree(tmp_path / 'data')
  for f in os.listdir(tmp_path / 'data' / 'train' / 'bee'):
    os.remove(tmp_path / 'data' / 'train' / 'bee' / f)
  monkeypatch.setattr(train_lib, 'phase_epochs', lambda *a, **k: pytest.fail('training started'))
  with pytest.raises(sources.DataError, match='bee'):
    incremental_jax.train_and_evaluate(_folder_config(tmp_path / 'data'), str(tmp_path / 'run'))


@needs_image_folder
def test_image_folder_with_an_unreadable_image(tmp_path, monkeypatch):
  _image_tree(tmp_path / 'data')
  (tmp_path / 'data' / 'train' / 'cat' / '1.png').write_bytes(b'not an image at all')
  monkeypatch.setattr(train_lib, 'phase_epochs', lambda *a, **k: pytest.fail('training started'))
  with pytest.raises(sources.DataError, match=r'1\.png'):
    incremental_jax.train_and_evaluate(_folder_config(tmp_path / 'data'), str(tmp_path / 'run'))
