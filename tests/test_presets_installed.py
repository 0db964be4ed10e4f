"""The presets ship with the package (`incremental_jax.configs`): a notebook in any directory imports them, and
the command-line files `configs/*.py` are those same presets."""
import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import setuptools

import incremental_jax.configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_CONFIGS = os.path.dirname(incremental_jax.configs.__file__)


def _names(directory: str) -> list:
  return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(directory, '*.py'))
                if not p.endswith('__init__.py'))


def _packaged() -> list:
  """The packages `pip install` puts in site-packages: pyproject.toml's `packages.find` include patterns, found
  the way setuptools finds them for a pyproject (namespaces on)."""
  tomllib = pytest.importorskip('tomllib')
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    find = tomllib.load(f)['tool']['setuptools']['packages']['find']
  return setuptools.find_namespace_packages(ROOT, include=find['include'], exclude=find.get('exclude', ()))


def test_pyproject_installs_the_presets():
  packaged = _packaged()
  assert 'incremental_jax' in packaged and 'incremental_jax.configs' in packaged
  assert 'configs' not in packaged          # the command-line files stay in the repository
  assert 'lucir' in _names(PACKAGE_CONFIGS)


def test_command_line_files_are_the_package_presets():
  """One `configs/<name>.py` per preset module, each re-exporting it: same `get_config`, presets and docstring
  (what `main.py --list` shows)."""
  import importlib
  assert _names(os.path.join(ROOT, 'configs')) == _names(PACKAGE_CONFIGS)
  for name in _names(PACKAGE_CONFIGS):
    cli = importlib.import_module(f'configs.{name}')
    package = importlib.import_module(f'incremental_jax.configs.{name}')
    assert cli.get_config is package.get_config and cli.__doc__ == package.__doc__, name
    assert cli.PRESETS is package.PRESETS if hasattr(package, 'PRESETS') else not hasattr(cli, 'PRESETS'), name


@pytest.mark.slow
def test_a_notebook_outside_the_repository_runs_a_packaged_preset(tmp_path):
  """The package as `pip install` lays it out (the packaged directories' Python files, copied into a site
  directory), imported by a script in a directory of its own with only that site directory on its path: it
  imports LUCIR's presets as the README shows and trains the `test` preset end to end."""
  site = tmp_path / 'site'
  for package in _packaged():
    source = os.path.join(ROOT, *package.split('.'))
    files = glob.glob(os.path.join(source, '*.py'))
    if files:
      os.makedirs(site.joinpath(*package.split('.')), exist_ok=True)
      for f in files:
        shutil.copy(f, site.joinpath(*package.split('.')))
  notebook = tmp_path / 'notebook'
  notebook.mkdir()
  script = textwrap.dedent('''
      import importlib.util, json
      import incremental_jax
      from incremental_jax.configs import lucir
      config = lucir.get_config('test')
      config.plots = False
      results = incremental_jax.train_and_evaluate(config, workdir='runs/lucir_test')
      print(json.dumps({'package': incremental_jax.__file__, 'presets': lucir.__file__,
                        'repo_configs': importlib.util.find_spec('configs') is not None,
                        'avg': results['avg_incremental_accuracy']}))
  ''')
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env['PYTHONPATH'] = str(site)
  out = subprocess.run([sys.executable, '-c', script], cwd=notebook, env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got['package'] == str(site / 'incremental_jax' / '__init__.py')
  assert got['presets'] == str(site / 'incremental_jax' / 'configs' / 'lucir.py')
  assert not got['repo_configs']            # the repository's `configs` package is out of reach
  written = json.loads((notebook / 'runs' / 'lucir_test' / 'results.json').read_text())
  assert written['avg_incremental_accuracy'] == got['avg']
  assert written['complete'] and len(written['steps']) == 3      # the test preset's 3 tasks, all trained
  from incremental_jax.configs import lucir
  expected = lucir.get_config('test')
  expected.plots = False
  assert written['config'] == json.loads(expected.to_json_best_effort())   # the packaged preset, unchanged
