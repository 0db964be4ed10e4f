"""What a result was computed with: package versions, backend and devices, XLA flags (`results.json`'s
`environment`). Two runs of one config on different versions can differ by float rounding (other kernels, other
fusions); `python -m incremental_jax.report` lists the environments of runs that differ in them.

Also where this package keeps per-user files (`cache_dir`) and JAX's persistent compilation cache
(`use_compilation_cache`, called by `train_and_evaluate`, never on import)."""
from __future__ import annotations

import os
import platform
from importlib import metadata

PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy')


def versions(packages=PACKAGES) -> dict:
  """{'python': '3.11.7', 'jax': '0.10.2', ...}; None for a package that is not installed."""
  out = {'python': platform.python_version()}
  for name in packages:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out


def cache_dir(environ=os.environ) -> str:
  """This package's per-user cache directory: $XDG_CACHE_HOME/incremental_jax (~/.cache/incremental_jax)."""
  root = environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'incremental_jax')


def describe() -> dict:
  """Versions, the default backend's platform, device kind and count, and the `XLA_FLAGS` of this process."""
  import jax
  device = jax.devices()[0]
  return {'versions': versions(), 'backend': device.platform, 'device_kind': device.device_kind,
          'device_count': jax.device_count(), 'process_count': jax.process_count(),
          'xla_flags': os.environ.get('XLA_FLAGS', '')}


def compilation_cache_dir(setting: str, environ=os.environ) -> str:
  """The persistent compilation cache directory of `config.compilation_cache` ('' = none): 'auto' is
  $XDG_CACHE_HOME/incremental_jax/xla (~/.cache/incremental_jax/xla); JAX_COMPILATION_CACHE_DIR, when set,
  is JAX's own setting and wins."""
  if environ.get('JAX_COMPILATION_CACHE_DIR') or not setting:
    return ''
  if setting == 'auto':
    return os.path.join(cache_dir(environ), 'xla')
  return os.path.abspath(os.path.expanduser(setting))


def use_compilation_cache(setting: str) -> None:
  """Points JAX's persistent compilation cache at `compilation_cache_dir(setting)`, also after this process
  compiled something else (the cache is re-opened). Every program is kept, however fast it compiled: the digits
  quick start compiles ~40 programs under JAX's default 1 s threshold, 1.3 s of a warm run when recompiled."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  path = compilation_cache_dir(setting)
  if not path or jax.config.jax_compilation_cache_dir == path:
    return
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  compilation_cache.reset_cache()
