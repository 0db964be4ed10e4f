"""XLA:CPU compiler flags that make the training step faster, set when `incremental_jax` is imported.

XLA reads `XLA_FLAGS` once, when its CPU client starts (the first computation of the process), so the flags are
added to the environment at import time, before any array exists. They are CPU-only: GPU and TPU compilers
ignore them.

- `--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION`: jaxlib 0.10 hands each
  convolution to the YNNPACK library by default, which ran the CIFAR ResNet convolutions of 16x16 and 8x8 maps on
  one of the two cores here (the same time pinned to one core); XLA's own Eigen convolutions use every core and
  took 3.8 ms instead of 7.2 ms for a 16x16x32 convolution at batch 128; the LUCIR ResNet-32 step went from
  1038 ms to 883 ms (`benchmarks/vs_torch.py`).

Unknown flags abort XLA, and this one is experimental, so it is only added for the jaxlib releases it was
measured on (`TESTED_JAXLIB`). The environment variable `INCREMENTAL_JAX_XLA_CPU_FLAGS` replaces the list
(empty: add nothing); a flag already present in `XLA_FLAGS` is left as the user set it.
"""
from __future__ import annotations

import logging
import os
from typing import Mapping, MutableMapping, Optional

DEFAULT_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION',)
TESTED_JAXLIB = ((0, 10),)   # (major, minor) releases whose XLA has the flags above
ENV_VAR = 'INCREMENTAL_JAX_XLA_CPU_FLAGS'


def _release(version: str) -> tuple:
  parts = version.split('.')
  try:
    return int(parts[0]), int(parts[1])
  except (IndexError, ValueError):
    return ()


def flags_to_add(jaxlib_version: str, environ: Mapping[str, str]) -> list[str]:
  """The flags `configure` would add to `environ['XLA_FLAGS']` for this jaxlib version."""
  if ENV_VAR in environ:
    wanted = environ[ENV_VAR].split()
  elif _release(jaxlib_version) in TESTED_JAXLIB:
    wanted = list(DEFAULT_FLAGS)
  else:
    wanted = []
  present = {f.split('=', 1)[0] for f in environ.get('XLA_FLAGS', '').split()}
  return [f for f in wanted if f.split('=', 1)[0] not in present]


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except Exception:  # a JAX without this private helper: assume not started
    return False


def configure(environ: Optional[MutableMapping[str, str]] = None) -> list[str]:
  """Adds the flags to `XLA_FLAGS` unless XLA has already started (then they could not take effect: a warning
  says so). Returns the flags added."""
  environ = os.environ if environ is None else environ
  import jaxlib
  add = flags_to_add(getattr(jaxlib, '__version__', ''), environ)
  if not add:
    return []
  if _backends_started():
    logging.getLogger(__name__).warning(
        'incremental_jax was imported after JAX had started its devices, so the XLA:CPU flags %s are not in effect '
        '(CPU training steps run slower); import incremental_jax first or put them in XLA_FLAGS.', ' '.join(add))
    return []
  environ['XLA_FLAGS'] = ' '.join([environ.get('XLA_FLAGS', '').strip(), *add]).strip()
  return add
