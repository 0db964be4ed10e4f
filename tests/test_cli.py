"""The command line (`incremental_jax.cli`): `incremental-jax` (the console script of the installed package),
`python -m incremental_jax` and `python main.py` take the same flags and do the same: `--list`, one-line errors
with exit status 2, the same run."""
import copy
import importlib.metadata
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from incremental_jax import cli, listing
from incremental_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_CONFIGS = os.path.join(ROOT, 'incremental_jax', 'configs')


def console_script() -> list:
  """The installed console script, next to this Python (pip puts it there); the test is skipped when the package is
  not installed in this Python's environment (a checkout run with PYTHONPATH), and fails when it is installed
  without its script."""
  script = os.path.join(os.path.dirname(sys.executable), 'incremental-jax')
  if os.path.isfile(script):
    return [script]
  try:
    installed = str(importlib.metadata.distribution('incremental_jax').locate_file('')).startswith(sys.prefix)
  except importlib.metadata.PackageNotFoundError:
    installed = False
  if not installed:
    pytest.skip(f'incremental_jax is not installed in {sys.prefix} (no incremental-jax next to {sys.executable}); '
                'pip install -e . makes the console script')
  pytest.fail(f'incremental_jax is installed but {script} does not exist')


COMMANDS = {
    'console_script': console_script,
    'python_m': lambda: [sys.executable, '-m', 'incremental_jax'],
    'main_py': lambda: [sys.executable, os.path.join(ROOT, 'main.py')],
}


def run(command: str, *args, cwd=ROOT) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return subprocess.run([*COMMANDS[command](), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_pyproject_declares_the_console_script():
  tomllib = pytest.importorskip('tomllib')
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    scripts = tomllib.load(f)['project']['scripts']
  assert scripts == {'incremental-jax': 'incremental_jax.cli:main'}
  module, function = scripts['incremental-jax'].split(':')
  assert getattr(importlib.import_module(module), function) is cli.main


def test_config_argument_takes_a_preset_module_by_name(tmp_path):
  assert cli.config_argument('lucir:digits', cwd=str(tmp_path)) == os.path.join(PACKAGE_CONFIGS, 'lucir.py:digits')
  assert cli.config_argument('icarl', cwd=str(tmp_path)) == os.path.join(PACKAGE_CONFIGS, 'icarl.py')
  assert cli.config_argument('configs/lucir.py:digits', cwd=ROOT) == 'configs/lucir.py:digits'
  assert cli.config_argument('/x/y.py:z', cwd=str(tmp_path)) == '/x/y.py:z'   # a path: config_flags reports it
  (tmp_path / 'lucir').write_text('')   # a file of that name in the current directory comes first
  assert cli.config_argument('lucir:digits', cwd=str(tmp_path)) == 'lucir:digits'
  with pytest.raises(ConfigError, match=r"--config='lucirr' is not a config file or a preset module.*'icarl', "
                                        r".*Did you mean 'lucir'\?"):
    cli.config_argument('lucirr:digits', cwd=str(tmp_path))
  assert cli.resolved_argv(['prog', '--config', 'lwf:test', '--config.seed=1', '--workdir=lwf']) == [
      'prog', '--config', os.path.join(PACKAGE_CONFIGS, 'lwf.py:test'), '--config.seed=1', '--workdir=lwf']


def test_shorthand_flags_set_their_fields_on_a_copy():
  from incremental_jax.configs import bake
  config = bake.get_config('test')
  config.sweep = ''           # a config with the field (incremental_jax.config declares it with the sweeps)
  config.lock()
  assert cli.overridden(config, compilation_cache=None, sweep=None) is config
  got = cli.overridden(config, compilation_cache='', sweep='optim.lr=0.1,0.2')
  assert (got.sweep, got.compilation_cache) == ('optim.lr=0.1,0.2', '')
  assert config.sweep == '' and config.compilation_cache != ''     # the flags' config is left as it was
  got.data.same_class_per_anchor = 5    # the copy keeps the preset's field references
  assert got.data.sampler_kwargs.same_class_per_anchor == 5
  without = copy.deepcopy(config)
  with without.unlocked():
    del without['sweep']
  with pytest.raises(ConfigError, match="--sweep: the config has no field 'sweep'"):
    cli.overridden(without, compilation_cache=None, sweep='x')
  assert cli.overridden(without, compilation_cache='/tmp/c', sweep=None).compilation_cache == '/tmp/c'


def test_distributed_args():
  none = {'coordinator_address': None, 'num_processes': None, 'process_id': None, 'distributed': False}
  assert cli.distributed_args(none, environ={}) is None
  assert cli.distributed_args({**none, 'distributed': True}, environ={}) == {
      'coordinator_address': None, 'num_processes': None, 'process_id': None}
  env = {'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': '4', 'JAX_PROCESS_ID': '3'}
  assert cli.distributed_args(none, environ=env) == {'coordinator_address': 'h:1', 'num_processes': 4,
                                                     'process_id': 3}
  assert cli.distributed_args({**none, 'process_id': 0}, environ=env)['process_id'] == 0   # the flag first


@pytest.mark.parametrize('command', list(COMMANDS))
def test_list_and_a_bad_preset(command, tmp_path, monkeypatch):
  """`--list` prints the package's presets (the same text from every command and any directory); an unknown preset
  is one line on stderr, exit status 2, by its path or by its module's name."""
  from incremental_jax import methods
  from incremental_jax.registry import Registry
  # the listing of a fresh process: without the methods other tests registered from outside the package
  builtin = {name: cls for name, cls in methods.METHODS.items() if cls.__module__.startswith('incremental_jax.')}
  monkeypatch.setattr(methods, 'METHODS', Registry(methods.METHODS.kind, builtin, methods.METHODS.hint))
  out = run(command, '--list', cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == listing.listing().strip()
  from incremental_jax.configs import lucir
  with pytest.raises(ValueError, match="preset='digitz' is not a preset; valid names: .*Did you mean 'digits'") as e:
    lucir.get_config('digitz')
  for config in ('configs/lucir.py:digitz', 'lucir:digitz'):
    out = run(command, f'--config={config}', f'--workdir={tmp_path}/run')
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [f'error: --config={config}: {e.value}']
  assert not os.path.exists(tmp_path / 'run')


def _tiny_run(command: str, config: str, workdir) -> dict:
  out = run(command, f'--config={config}', f'--workdir={workdir}', '--config.optim.epochs=1')
  assert out.returncode == 0, (command, out.stderr[-3000:])
  return json.loads((workdir / 'results.json').read_text())


@pytest.fixture(scope='module')
def main_py_run(tmp_path_factory) -> dict:
  """The README's command on a tiny digits run: finetune's `test` preset, one epoch per task."""
  return _tiny_run('main_py', 'configs/finetune.py:test', tmp_path_factory.mktemp('main_py'))


@pytest.mark.slow
@pytest.mark.parametrize('command', ['python_m', 'console_script'])
def test_every_command_trains_the_same_run(command, main_py_run, tmp_path, comparable):
  """The tiny run of `main_py_run` by another command, its config named by the preset module: the same
  results.json."""
  got = _tiny_run(command, 'finetune:test', tmp_path / 'run')
  assert main_py_run['complete'] and main_py_run['config']['optim']['epochs'] == 1
  assert comparable(got) == comparable(main_py_run)
  assert got['config'] == main_py_run['config']
