"""Shared fixtures. Runs on whatever devices the process has (1 CPU device by default); tests that need
several devices start a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8."""
import functools
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# One persistent XLA compilation cache for the session (in-process and subprocess tests alike): the same
# tiny programs are compiled by many tests. Set before JAX is imported, so JAX reads it from the environment.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(ROOT, '.pytest_cache', 'xla'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


@functools.lru_cache(maxsize=None)
def _digits_run(config_module: str, preset: str, overrides: tuple, tmp_root: str) -> dict:
  import importlib
  import incremental_jax
  cfg = importlib.import_module(f'configs.{config_module}').get_config(preset)
  cfg.progress = False
  cfg.plots = False
  for key, value in overrides:
    node = cfg
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  workdir = os.path.join(tmp_root, f'{config_module}_{preset}_{abs(hash(overrides))}')
  return incremental_jax.train_and_evaluate(cfg, workdir)


@pytest.fixture(scope='session')
def digits_run(tmp_path_factory):
  """`digits_run('icarl', preset='digits', **overrides) -> results`, each distinct run computed once per session
  (method tests share the finetune baseline)."""
  root = str(tmp_path_factory.mktemp('digits_runs'))

  def run(config_module: str, preset: str = 'digits', **overrides):
    return _digits_run(config_module, preset, tuple(sorted((k.replace('__', '.'), v) for k, v in overrides.items())), root)

  return run


@pytest.fixture(scope='session')
def eight_devices():
  """`eight_devices(script) -> dict`: runs a Python script in a subprocess on 8 simulated CPU devices and returns
  the JSON object printed on its last line (fails with the script's stderr if it fails)."""
  import json
  import subprocess

  def run(script: str) -> dict:
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu',
               PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    out = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])

  return run


@pytest.fixture(scope='session')
def tiny_workdirs(tmp_path_factory):
  """Three small workdirs trained once per session (tests of TensorBoard logging and of the report read them):
  `finetune` and `lucir` (the `test` presets, 4 + 3 + 3 classes) and `lucir_group` (the LUCIR one with
  `num_runs=2`: summary.json and run_0/, run_1/). Returns {name: workdir}."""
  import incremental_jax
  from configs import finetune, lucir
  root = tmp_path_factory.mktemp('tiny_workdirs')
  workdirs = {}
  for name, module, num_runs in (('finetune', finetune, 1), ('lucir', lucir, 1), ('lucir_group', lucir, 2)):
    cfg = module.get_config('test')
    cfg.num_runs = num_runs
    workdirs[name] = str(root / name)
    incremental_jax.train_and_evaluate(cfg, workdirs[name])
  return workdirs
