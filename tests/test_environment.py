"""results.json records what it was computed with (`environment`), the comparison report lists the
environments of runs computed in different ones, and the persistent compilation cache goes where the config says."""
import json
import os
import platform
from importlib import metadata

import jax
import jaxlib

from incremental_jax import environment, report


def test_versions_and_devices_are_those_of_this_process():
  env = environment.describe()
  assert env['versions']['python'] == platform.python_version()
  assert env['versions']['jax'] == jax.__version__ and env['versions']['jaxlib'] == jaxlib.__version__
  assert env['versions']['orbax-checkpoint'] == metadata.version('orbax-checkpoint')
  assert set(env['versions']) == {'python', *environment.PACKAGES}
  assert env['backend'] == jax.default_backend() and env['device_count'] == jax.device_count()
  assert env['device_kind'] == jax.devices()[0].device_kind
  assert environment.versions(('no-such-package-of-incremental-jax',))['no-such-package-of-incremental-jax'] is None
  json.dumps(env)   # it goes into results.json


def test_results_json_records_the_environment(tiny_workdirs):
  with open(os.path.join(tiny_workdirs['lucir'], 'results.json')) as f:
    assert json.load(f)['environment']['versions'] == environment.versions()


def _entry(name, env):
  return report.Entry(name, [{'method': name, 'environment': env}])


def test_the_report_lists_environments_only_when_they_differ():
  a = environment.describe()
  b = {**a, 'versions': {**a['versions'], 'jax': '9.9.9'}}
  assert report.environment_note([_entry('lucir', a), _entry('icarl', a)]) == ''
  note = report.environment_note([_entry('lucir', a), _entry('icarl', b), _entry('podnet', None)])
  lines = [line for line in note.splitlines() if line.startswith('- ')]
  assert len(lines) == 3
  assert f"jax {a['versions']['jax']}," in lines[0] and 'jax 9.9.9,' in lines[1]
  assert lines[2] == '- podnet: not recorded'


def test_compilation_cache_dir_setting():
  assert environment.compilation_cache_dir('auto', {'XDG_CACHE_HOME': '/c'}) == '/c/incremental_jax/xla'
  assert environment.compilation_cache_dir('auto', {}) == os.path.join(os.path.expanduser('~'), '.cache',
                                                                       'incremental_jax', 'xla')
  assert environment.compilation_cache_dir('', {}) == ''
  assert environment.compilation_cache_dir('/tmp/x', {}) == '/tmp/x'
  assert environment.compilation_cache_dir('auto', {'JAX_COMPILATION_CACHE_DIR': '/j'}) == ''   # JAX's own wins
