"""The XLA:CPU flags of `backend_tuning`: per measured jaxlib release, never over the user's own, and for a release
that was not measured only once XLA was seen to accept them (a subprocess), with a warning; set by `set_up()`
before JAX's backend starts, and named with their measured cost in one line when it started before."""
import json
import os
import subprocess
import sys

import jaxlib
import pytest

from incremental_jax import backend_tuning as bt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = bt.XLA_CPU_FLAGS[(0, 12)][0]
NAME = FLAG.split('=')[0]


def _never_asked(*args):
  raise AssertionError('a measured release must not be probed')


@pytest.mark.parametrize('version', ['0.10.2', '0.11.0', '0.12.0.1'])
def test_every_measured_release_gets_its_flags_without_a_probe(version, caplog):
  assert bt.flags_to_add(version, {}, accepts=_never_asked) == [FLAG]
  assert not caplog.records


def test_the_users_flags_win():
  # Their own value of the flag is kept; their other flags are kept and ours added.
  assert bt.flags_to_add('0.12.0', {'XLA_FLAGS': f'{NAME}=+LIBRARY_FUSION_TYPE_ELTWISE'}, _never_asked) == []
  assert bt.flags_to_add('0.12.0', {'XLA_FLAGS': '--xla_cpu_enable_fast_math=false'}, _never_asked) == [FLAG]
  # The environment variable replaces the list (empty: nothing), whatever the release, without a probe.
  assert bt.flags_to_add('0.10.2', {bt.ENV_VAR: ''}, _never_asked) == []
  assert bt.flags_to_add('9.9', {bt.ENV_VAR: '--a=1 --b=2'}, _never_asked) == ['--a=1', '--b=2']


@pytest.mark.parametrize('accepted', [True, False])
def test_an_unmeasured_release_gets_the_newest_flags_only_if_xla_accepts_them(accepted, caplog):
  asked = []
  accepts = lambda version, flags: asked.append((version, list(flags))) or accepted
  got = bt.flags_to_add('0.13.1', {}, accepts)
  assert asked == [('0.13.1', list(bt.XLA_CPU_FLAGS[max(bt.XLA_CPU_FLAGS)]))]
  assert got == ([FLAG] if accepted else [])
  assert len(caplog.records) == 1 and 'jaxlib 0.13.1 was not measured' in caplog.text
  assert bt.flags_to_add('dev', {}, lambda v, f: True) == [FLAG]


def test_configure_appends_to_xla_flags():
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  assert bt.configure(env, jaxlib_version='0.12.0.1') == [FLAG]
  assert env['XLA_FLAGS'] == f'--xla_force_host_platform_device_count=2 {FLAG}'
  assert bt.configure(env, jaxlib_version='0.12.0.1') == []    # idempotent


def test_the_probe_answer_is_cached_per_jaxlib_version(tmp_path):
  calls = []
  probe = lambda flags: calls.append(flags) or True
  cache = str(tmp_path / 'sub' / 'cache.json')
  assert bt.cached_accepts('0.13.0', [FLAG], probe, cache) and bt.cached_accepts('0.13.0', [FLAG], probe, cache)
  assert len(calls) == 1
  assert not bt.cached_accepts('0.14.0', [FLAG], lambda flags: False, cache)
  assert sorted(json.load(open(cache)).values()) == [False, True]


def test_xla_accepts_a_known_flag_and_refuses_an_unknown_one():
  """The real probe: this jaxlib's XLA knows the flags measured on it and aborts on a made-up one."""
  flags, measured = bt.measured_flags(jaxlib.__version__)
  assert measured, f'jaxlib {jaxlib.__version__} is not in backend_tuning.XLA_CPU_FLAGS'
  assert bt.xla_accepts(flags)
  assert not bt.xla_accepts(['--xla_cpu_no_such_flag_of_incremental_jax=1'])


# A convolution compiled by this process: XLA:CPU calls it `ynn_fusion` when YNNPACK runs it, which the flag stops.
_CONV = ('import jax, jax.numpy as jnp\n'
         "conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', "
         "dimension_numbers=('NHWC', 'HWIO', 'NHWC')))\n"
         'def ynn(): return "ynn_fusion" in conv.lower(jnp.ones((8, 16, 16, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text()\n')


def _python(code: str) -> subprocess.CompletedProcess:
  """`code` in a fresh interpreter whose environment has neither XLA_FLAGS nor the flags variable."""
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', bt.ENV_VAR)}
  return subprocess.run([sys.executable, '-c', code], cwd=ROOT, env={**env, 'JAX_PLATFORMS': 'cpu'},
                        capture_output=True, text=True, timeout=300, check=True)


def test_set_up_before_the_first_computation_applies_the_flags():
  """`set_up()` after `import jax` but before a computation (as in `main.py` and `train_and_evaluate`): the flags
  are in XLA_FLAGS and XLA compiles with them (no YNNPACK convolution); without `set_up()`, it does not."""
  code = ('import json, os\n' + _CONV + 'from incremental_jax import backend_tuning as bt\n'
          'added = bt.set_up()\n'
          'print(json.dumps([added, os.environ["XLA_FLAGS"], ynn(), bt.set_up()]))\n')
  added, xla_flags, ynn, again = json.loads(_python(code).stdout)
  assert added == [FLAG] and xla_flags == FLAG and again == []     # idempotent
  assert not ynn
  assert json.loads(_python('import json\n' + _CONV + 'print(json.dumps(ynn()))').stdout)   # what the flag stops


def test_set_up_after_the_backend_started_says_once_what_is_not_applied():
  """A notebook that computed before: XLA_FLAGS stays as the backend read it, the convolution stays YNNPACK's, and
  one line on stderr names the flag and its measured cost."""
  code = ('import json, os\n' + _CONV + 'before = ynn()\n'
          'from incremental_jax import backend_tuning as bt\n'
          'added = [bt.set_up(), bt.set_up()]\n'
          'print(json.dumps([before, added, os.environ.get("XLA_FLAGS"), ynn()]))\n')
  out = _python(code)
  before, added, xla_flags, ynn = json.loads(out.stdout)
  assert before and ynn and added == [[], []] and xla_flags is None
  lines = [line for line in out.stderr.splitlines() if 'incremental_jax' in line]
  assert len(lines) == 1 and FLAG in lines[0] and 'not applied' in lines[0], out.stderr
  assert f'{bt.SLOWER_WITHOUT[bt.release(jaxlib.__version__)]}x slower' in lines[0]


def test_started_backend_without_jax_imported_is_none_and_imports_nothing():
  code = 'import sys; from incremental_jax import backend_tuning as bt; print(bt.started_backend(), "jax" in sys.modules)'
  assert _python(code).stdout.split() == ['None', 'False']


@pytest.mark.parametrize('platform', [None, 'cpu', 'gpu'])
def test_set_up_adds_the_flags_only_before_the_backend_starts(platform, caplog, monkeypatch):
  monkeypatch.setattr(bt, '_reported', set())
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  assert bt.set_up(env, '0.12.0.1', started=lambda: platform) == ([FLAG] if platform is None else [])
  assert bt.set_up(env, '0.12.0.1', started=lambda: platform) == []     # idempotent
  assert env['XLA_FLAGS'] == '--xla_force_host_platform_device_count=2' + (f' {FLAG}' if platform is None else '')
  assert len(caplog.records) == (platform == 'cpu')       # once, and only where XLA:CPU flags matter
  if platform == 'cpu':
    assert caplog.records[0].getMessage() == bt.not_applied([FLAG], '0.12.0.1')


def test_the_line_gives_the_measured_cost_of_exactly_the_measured_flags():
  assert '2.5x slower without it on jaxlib 0.12' in bt.not_applied([FLAG], '0.12.0.1')
  assert '1.2x slower without it on jaxlib 0.10' in bt.not_applied([FLAG], '0.10.2')
  for flags, version in (([FLAG], '0.13.0'), (['--a=1'], '0.12.0')):   # not measured: no figure
    line = bt.not_applied(flags, version)
    assert 'x slower' not in line and 'not measured' in line and flags[0] in line
  assert set(bt.SLOWER_WITHOUT) == set(bt.XLA_CPU_FLAGS)   # every measured release has its cost
