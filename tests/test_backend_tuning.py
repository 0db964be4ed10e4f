"""The XLA:CPU flags of `backend_tuning`: per measured jaxlib release, never over the user's own, and for a release
that was not measured only once XLA was seen to accept them (a subprocess), with a warning."""
import json
import subprocess
import sys

import jaxlib
import pytest

from incremental_jax import backend_tuning as bt

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


def test_importing_the_package_sets_the_flags_before_jax_starts():
  """The flags are in XLA_FLAGS once `incremental_jax` is imported, which imports no JAX (so no backend can have
  started before them), and stay there through the first computation."""
  code = ("import os, sys, incremental_jax; assert 'jax' not in sys.modules; import jax.numpy as jnp; "
          'jnp.ones(2).block_until_ready(); print(os.environ["XLA_FLAGS"])')
  env = {k: v for k, v in __import__('os').environ.items() if k not in ('XLA_FLAGS', bt.ENV_VAR)}
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True)
  assert out.stdout.split() == list(bt.measured_flags(jaxlib.__version__)[0])
  assert 'not measured' not in out.stderr and 'Traceback' not in out.stderr
