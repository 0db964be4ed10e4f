"""A method defined outside the package (examples/custom_method: LwF with a cosine head) runs through the
library without editing any of its files: registered from its own module, from a notebook-style call and from
`main.py` (with `num_runs`)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import incremental_jax
from examples.custom_method import config as example_config
from examples.custom_method.cosine_lwf import CosineLwF
from incremental_jax.errors import ConfigError
from incremental_jax.methods import METHODS, Method, build_method, register_method

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_registration_names_the_class_and_refuses_silent_replacement():
  assert METHODS['cosine_lwf'] is CosineLwF
  assert register_method('cosine_lwf', CosineLwF) is CosineLwF          # the same class again: a no-op
  other = type('Other', (Method,), {'loss': lambda *a: None})
  with pytest.raises(ValueError, match='already registered'):
    register_method('cosine_lwf', other)
  with pytest.raises(TypeError, match='subclass'):
    register_method('not_a_method', object)
  c = example_config.get_config('test')
  c.method.name = 'cosine_lwff'
  with pytest.raises(ConfigError, match="method.name='cosine_lwff' is not a method"):
    build_method(c, 10, (8, 8, 1))


@pytest.fixture(scope='module')
def example_runs(tmp_path_factory):
  """The example on the `test` preset, and the same run with its distillation weight at 0."""
  root = tmp_path_factory.mktemp('custom')
  runs = {}
  for kd_weight in (3.0, 0.0):
    c = example_config.get_config('test')
    c.method.kd_weight = kd_weight
    runs[kd_weight] = incremental_jax.train_and_evaluate(c, str(root / f'kd{kd_weight}'))
  return runs


def test_the_example_trains_with_its_own_loss(example_runs):
  with_kd, without = example_runs[3.0], example_runs[0.0]
  assert with_kd['complete'] and with_kd['method'] == 'cosine_lwf' and with_kd['compilations'] == 2   # task 0 without a teacher, later tasks with one
  first = [s['epoch_losses']['train'] for s in with_kd['steps']]
  plain = [s['epoch_losses']['train'] for s in without['steps']]
  assert first[0] == plain[0]                      # task 0 has no teacher: the same cross-entropy
  assert all(np.isfinite(first[t]).all() for t in range(3))
  assert first[1] != plain[1]                      # later tasks add the method's distillation term
  assert with_kd['config']['model']['head'] == 'cosine'


def test_the_example_runs_from_main_py_in_a_group(tmp_path):
  workdir = tmp_path / 'group'
  out = subprocess.run([sys.executable, 'main.py', '--config=examples/custom_method/config.py:test',
                        f'--workdir={workdir}', '--config.num_runs=2'], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['method'] == 'cosine_lwf' and summary['num_runs'] == 2
  runs = [json.loads((workdir / f'run_{k}' / 'results.json').read_text()) for k in range(2)]
  assert [r['config']['seed'] for r in runs] == [0, 1] and runs[0]['class_order'] != runs[1]['class_order']
