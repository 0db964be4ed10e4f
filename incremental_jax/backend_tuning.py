"""What incremental_jax sets per backend and per jaxlib release to make the training step fast, and why.

Everything here was measured with `benchmarks/vs_torch.py` (the LUCIR ResNet-32 step, batch 128) on the 2-core
AMD EPYC CPUs of this project; the figures per release are in benchmarks/README.md. Nothing here changes a
result in exact arithmetic: the flags choose other convolution kernels (the last digits of float sums move), the
convolution lowering adds an exact identity product.

XLA:CPU flags (`XLA_CPU_FLAGS`), added to the environment variable `XLA_FLAGS` by `set_up()`, which `main.py`
calls before it imports JAX and `train_and_evaluate` calls first (importing `incremental_jax` changes no
environment variable, starts no process and writes no file). `XLA_FLAGS` is XLA's documented way to pass compiler
flags; XLA reads it once, when the process's first computation starts JAX's backend, so the flags are in effect
only when `set_up()` runs before that. In a notebook that computed with JAX before, `set_up()` leaves `XLA_FLAGS`
as it is (results.json's `environment` records what the backend runs with) and says in one line on stderr, once,
which flag is not applied and what it cost when measured (`SLOWER_WITHOUT`); calling
`incremental_jax.backend_tuning.set_up()` before the first computation avoids that. GPU and TPU compilers ignore
XLA:CPU flags, so a backend started on them gets no line.

- `--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION` (jaxlib 0.10, 0.11,
  0.12): these releases hand each convolution to the YNNPACK library, which ran the CIFAR ResNet's 16x16 and 8x8
  convolutions on one of the two cores (7.2 ms for a 16x16x32 convolution at batch 128, against 3.8 ms for
  XLA's own Eigen convolution on both cores). Without the flag the step was 1.2x slower on jaxlib 0.10,
  1.3x on 0.11 and 2.5x on 0.12.

A jaxlib outside the measured releases gets the newest measured flags if its XLA accepts them (an unknown flag
aborts XLA, so a subprocess started with the flags tries first, in `set_up()`; the answer is cached per jaxlib
version in `~/.cache/incremental_jax/`), and one line on stderr says that the release was not measured. The
environment variable `INCREMENTAL_JAX_XLA_CPU_FLAGS` replaces the list (empty: add nothing); a flag already in
`XLA_FLAGS` is left as the user set it.

Whether the backend started: JAX 0.10 and 0.12 have no public call that says so (`jax.extend.backend.backends()`
and `jax.devices()` start it; the check, `backends_are_initialized`, is in `jax._src.xla_bridge`). `started_backend`
asks JAX's public config instead: the option `jax_num_cpu_devices` "must be set before JAX is initialized" and
`jax.config.update` refuses to change it afterwards with a RuntimeError (JAX's own `test_util` relies on that
refusal). It is set to another negative value and back (negative means "not set" to JAX, like the default -1, so
a backend that another thread started in between would not differ). Without JAX imported, nothing can have
started, and JAX is not imported.

Convolution lowering (`conv_lowering`, read when a model is built): on CPU, 'materialized_large' (see
`models/conv.py`: a differentiated convolution with an input of at least 2^18 elements reads it through an
exact identity product, so XLA:CPU does not recompute the input's BatchNorm/ReLU/residual producers inside the
transposes of the weight gradient; the step was 1.2x to 2x faster on jaxlib 0.10 and 0.12); XLA's plain
convolution on GPU and TPU, whose compilers do not recompute fused producers that way.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from typing import Callable, Mapping, MutableMapping, Optional

from incremental_jax import environment

ENV_VAR = 'INCREMENTAL_JAX_XLA_CPU_FLAGS'
_NO_YNN_CONV = '--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'

# (major, minor) of jaxlib -> the XLA:CPU flags measured to pay on it (module docstring).
XLA_CPU_FLAGS: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 10): (_NO_YNN_CONV,),
    (0, 11): (_NO_YNN_CONV,),
    (0, 12): (_NO_YNN_CONV,),
}

# (major, minor) of jaxlib -> how many times slower the LUCIR ResNet-32 CPU step (batch 128) was without its
# XLA_CPU_FLAGS (module docstring; benchmarks/README.md): what a flag that came too late costs (`not_applied`).
SLOWER_WITHOUT: dict[tuple[int, int], float] = {(0, 10): 1.2, (0, 11): 1.3, (0, 12): 2.5}

# backend platform -> convolution lowering of `models/conv.py` (module docstring); any other backend: 'xla'.
CONV_LOWERING: dict[str, str] = {'cpu': 'materialized_large'}

_log = logging.getLogger(__name__)


def release(version: str) -> Optional[tuple[int, int]]:
  """(major, minor) of a version string ('0.12.0.1' -> (0, 12)); None if it has no such prefix."""
  parts = version.split('.')
  try:
    return int(parts[0]), int(parts[1])
  except (IndexError, ValueError):
    return None


def measured_flags(jaxlib_version: str) -> tuple[tuple[str, ...], bool]:
  """(flags, measured): the flags measured on this jaxlib release, or the newest release's flags and False."""
  rel = release(jaxlib_version)
  if rel in XLA_CPU_FLAGS:
    return XLA_CPU_FLAGS[rel], True
  return XLA_CPU_FLAGS[max(XLA_CPU_FLAGS)], False


def _names(flags) -> set[str]:
  return {f.split('=', 1)[0] for f in flags}


def missing(flags, xla_flags: str) -> list[str]:
  """The flags whose name is not already in the `XLA_FLAGS` string (the user's own value wins)."""
  present = _names(xla_flags.split())
  return [f for f in flags if f.split('=', 1)[0] not in present]


def xla_accepts(flags, python: str = sys.executable, timeout: float = 120.0) -> bool:
  """Whether XLA:CPU starts and computes with `flags` in `XLA_FLAGS`, tried in a subprocess (an unknown flag
  aborts the process that starts XLA)."""
  env = dict(os.environ, XLA_FLAGS=' '.join(flags), JAX_PLATFORMS='cpu')
  env.pop(ENV_VAR, None)
  code = 'import jax.numpy as jnp; print(float((jnp.arange(3.0) * 2).sum()))'
  try:
    done = subprocess.run([python, '-c', code], env=env, capture_output=True, text=True, timeout=timeout)
  except (OSError, subprocess.TimeoutExpired):
    return False
  return done.returncode == 0 and done.stdout.strip() == '6.0'


def cached_accepts(jaxlib_version: str, flags, probe: Callable = xla_accepts,
                   cache_file: Optional[str] = None) -> bool:
  """`probe(flags)`, remembered per jaxlib version and flag list in a JSON file (an unwritable cache only
  costs a new probe next time)."""
  cache_file = cache_file or os.path.join(environment.cache_dir(), 'xla_flags.json')
  key = hashlib.sha256(' '.join([jaxlib_version, *flags]).encode()).hexdigest()[:16]
  try:
    with open(cache_file) as f:
      known = json.load(f)
  except (OSError, ValueError):
    known = {}
  if not isinstance(known, dict):
    known = {}
  if not isinstance(known.get(key), bool):
    known[key] = bool(probe(flags))
    try:
      os.makedirs(os.path.dirname(cache_file), exist_ok=True)
      with open(cache_file, 'w') as f:
        json.dump(known, f)
    except OSError:
      pass
  return known[key]


def wanted(jaxlib_version: str, environ: Mapping[str, str]) -> tuple[list[str], bool]:
  """(flags, sure): the flags for this jaxlib that are not yet in `environ['XLA_FLAGS']`, and whether they need no
  probe (the user's `ENV_VAR` list, or a measured release's flags; module docstring)."""
  xla_flags = environ.get('XLA_FLAGS', '')
  if ENV_VAR in environ:
    return missing(environ[ENV_VAR].split(), xla_flags), True
  flags, measured = measured_flags(jaxlib_version)
  return missing(flags, xla_flags), measured


def flags_to_add(jaxlib_version: str, environ: Mapping[str, str], accepts: Callable = cached_accepts) -> list[str]:
  """The flags `configure` adds to `environ['XLA_FLAGS']` for this jaxlib version (module docstring);
  `accepts(jaxlib_version, flags)` is asked only for a release that was not measured."""
  add, sure = wanted(jaxlib_version, environ)
  if sure or not add:
    return add
  if accepts(jaxlib_version, add):
    _log.warning('incremental_jax: jaxlib %s was not measured (backend_tuning.XLA_CPU_FLAGS); using the flags '
                 'of jaxlib %d.%d: %s', jaxlib_version, *max(XLA_CPU_FLAGS), ' '.join(add))
    return add
  _log.warning('incremental_jax: jaxlib %s was not measured (backend_tuning.XLA_CPU_FLAGS) and its XLA refuses '
               '%s; no XLA:CPU flags set (CPU training may be slower)', jaxlib_version, ' '.join(add))
  return []


def installed_jaxlib() -> str:
  """The installed jaxlib's version, read from its package metadata (importing it would load XLA)."""
  return environment.versions(('jaxlib',))['jaxlib'] or ''


def configure(environ: Optional[MutableMapping[str, str]] = None, jaxlib_version: Optional[str] = None) -> list[str]:
  """Adds the XLA:CPU flags of this jaxlib to `environ['XLA_FLAGS']` (default `os.environ`) without importing
  JAX. Returns the flags added."""
  environ = os.environ if environ is None else environ
  add = flags_to_add(jaxlib_version or installed_jaxlib(), environ)
  if add:
    environ['XLA_FLAGS'] = ' '.join([environ.get('XLA_FLAGS', '').strip(), *add]).strip()
  return add


def started_backend() -> Optional[str]:
  """The platform of JAX's default backend ('cpu', 'gpu', ...) if it has started in this process, else None.
  JAX has no public call for this; `jax_num_cpu_devices` refuses a new value once it started (module docstring).
  JAX not imported: None, without importing it."""
  if 'jax' not in sys.modules:
    return None
  import jax
  current = jax.config.jax_num_cpu_devices
  try:
    jax.config.update('jax_num_cpu_devices', min(current, -1) - 1)   # negative: "not set", as -1
  except RuntimeError:
    return jax.default_backend()
  jax.config.update('jax_num_cpu_devices', current)
  return None


def not_applied(flags, jaxlib_version: str) -> str:
  """The line saying that `flags` came after JAX's backend started, with what they cost where it was measured
  (`SLOWER_WITHOUT`, for exactly the release's `XLA_CPU_FLAGS`)."""
  rel = release(jaxlib_version)
  slower = SLOWER_WITHOUT.get(rel) if tuple(flags) == XLA_CPU_FLAGS.get(rel) else None
  cost = (f'the LUCIR ResNet-32 CPU step was measured {slower}x slower without it on jaxlib {rel[0]}.{rel[1]}, '
          'benchmarks/README.md' if slower else 'its cost on this jaxlib was not measured')
  return (f'incremental_jax: JAX computed before the XLA:CPU flags were set, so {" ".join(flags)} is not applied '
          f'in this process ({cost}); to apply it, call incremental_jax.backend_tuning.set_up() before JAX\'s first '
          'computation, in a new process')


_reported: set[str] = set()   # the `not_applied` lines already written by this process


def set_up(environ: Optional[MutableMapping[str, str]] = None, version: Optional[str] = None,
           started: Callable[[], Optional[str]] = started_backend) -> list[str]:
  """Sets JAX's backend up for this jaxlib; idempotent, and effective when called before JAX's first computation
  (`main.py` and `train_and_evaluate` call it; module docstring). Before: adds the XLA:CPU flags to
  `environ['XLA_FLAGS']` (default `os.environ`; `configure`). After, on CPU: leaves `XLA_FLAGS` as the backend
  read it and says once on stderr which flags are not applied and what they cost (`not_applied`). Returns the
  flags added."""
  environ = os.environ if environ is None else environ
  version = version or installed_jaxlib()
  platform = started()
  if platform is None:
    return configure(environ, version)
  late, _ = wanted(version, environ)
  line = not_applied(late, version) if late and platform == 'cpu' else ''
  if line and line not in _reported:
    _reported.add(line)
    _log.warning(line)
  return []


def conv_lowering(backend: str) -> str:
  """The convolution lowering of `models/conv.py` for a backend platform ('cpu', 'gpu', 'tpu', ...)."""
  return CONV_LOWERING.get(backend, 'xla')
