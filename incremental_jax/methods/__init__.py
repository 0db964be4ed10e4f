"""Methods, registered by name. A method is a `Method` subclass (see `methods.base`)."""
from __future__ import annotations

from incremental_jax.methods.base import Method, Phase, TaskContext, TaskInfo, snapshot
from incremental_jax.methods.baselines import Finetune, ICaRL, Joint, LwF
from incremental_jax.methods.lucir import Lucir
from incremental_jax.methods.podnet import PODNet
from incremental_jax.methods.bake import BAKE
from incremental_jax.methods.iekd import IEDML, IEKD, KD
from incremental_jax.methods.m2kd import M2KD, M2KDExemplars

METHODS: dict[str, type] = {
    'finetune': Finetune,
    'joint': Joint,
    'lwf': LwF,
    'icarl': ICaRL,
    'lucir': Lucir,
    'podnet': PODNet,
    'bake': BAKE,
    'kd': KD,
    'iekd': IEKD,
    'iekd_dml': IEDML,
    'm2kd': M2KD,
    'm2kd_exemplars': M2KDExemplars,
}


def build_method(config) -> Method:
  name = config.method.name
  if name not in METHODS:
    raise ValueError(f'Unknown method {name!r}; valid names: {sorted(METHODS)}.')
  return METHODS[name](config)
