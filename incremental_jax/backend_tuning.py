"""What incremental_jax sets per backend and per jaxlib release to make the training step fast, and why.

Everything here was measured with `benchmarks/vs_torch.py` (the LUCIR ResNet-32 step, batch 128) on the 2-core
AMD EPYC CPUs of this project; the figures per release are in benchmarks/README.md. Nothing here changes a
result in exact arithmetic: the flags choose other convolution kernels (the last digits of float sums move), the
convolution lowering adds an exact identity product.

XLA:CPU flags (`XLA_CPU_FLAGS`), added to the environment variable `XLA_FLAGS` when `incremental_jax` is imported
(`configure`). `XLA_FLAGS` is XLA's documented way to pass compiler flags; XLA reads it once, when the process's
first computation starts the backend, so the flags are in effect when `incremental_jax` is imported before JAX
computes anything (`main.py` does; in a notebook, import it first). Imported later, the flags only reach the
processes started from this one: nothing needs to know whether JAX has started. GPU and TPU compilers ignore
XLA:CPU flags.

- `--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION` (jaxlib 0.10, 0.11,
  0.12): these releases hand each convolution to the YNNPACK library, which ran the CIFAR ResNet's 16x16 and 8x8
  convolutions on one of the two cores (7.2 ms for a 16x16x32 convolution at batch 128, against 3.8 ms for
  XLA's own Eigen convolution on both cores). Without the flag the step was 1.2x slower on jaxlib 0.10,
  1.3x on 0.11 and 2.5x on 0.12.

A jaxlib outside the measured releases gets the newest measured flags if its XLA accepts them (an unknown flag
aborts XLA, so a subprocess started with the flags tries first; the answer is cached per jaxlib version in
`~/.cache/incremental_jax/`), and one line on stderr says that the release was not measured. The environment
variable `INCREMENTAL_JAX_XLA_CPU_FLAGS` replaces the list (empty: add nothing); a flag already in `XLA_FLAGS`
is left as the user set it.

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


def flags_to_add(jaxlib_version: str, environ: Mapping[str, str], accepts: Callable = cached_accepts) -> list[str]:
  """The flags `configure` adds to `environ['XLA_FLAGS']` for this jaxlib version (module docstring);
  `accepts(jaxlib_version, flags)` is asked only for a release that was not measured."""
  xla_flags = environ.get('XLA_FLAGS', '')
  if ENV_VAR in environ:
    return missing(environ[ENV_VAR].split(), xla_flags)
  flags, measured = measured_flags(jaxlib_version)
  add = missing(flags, xla_flags)
  if measured or not add:
    return add
  if accepts(jaxlib_version, add):
    _log.warning('incremental_jax: jaxlib %s was not measured (backend_tuning.XLA_CPU_FLAGS); using the flags '
                 'of jaxlib %d.%d: %s', jaxlib_version, *max(XLA_CPU_FLAGS), ' '.join(add))
    return add
  _log.warning('incremental_jax: jaxlib %s was not measured (backend_tuning.XLA_CPU_FLAGS) and its XLA refuses '
               '%s; no XLA:CPU flags set (CPU training may be slower)', jaxlib_version, ' '.join(add))
  return []


def configure(environ: Optional[MutableMapping[str, str]] = None, jaxlib_version: Optional[str] = None) -> list[str]:
  """Adds the XLA:CPU flags of this jaxlib to `environ['XLA_FLAGS']` (default `os.environ`) without importing
  JAX. Returns the flags added."""
  environ = os.environ if environ is None else environ
  if jaxlib_version is None:
    jaxlib_version = environment.versions(('jaxlib',))['jaxlib'] or ''
  add = flags_to_add(jaxlib_version, environ)
  if add:
    environ['XLA_FLAGS'] = ' '.join([environ.get('XLA_FLAGS', '').strip(), *add]).strip()
  return add


def conv_lowering(backend: str) -> str:
  """The convolution lowering of `models/conv.py` for a backend platform ('cpu', 'gpu', 'tpu', ...)."""
  return CONV_LOWERING.get(backend, 'xla')
