"""Methods, registered by name. A method is a `Method` subclass (see `methods.base`).

A method defined outside the package (a user's module or notebook) joins the registry with
`incremental_jax.register_method(name, cls)`; its config then sets `method.name = name` and runs through
`train_and_evaluate` / `main.py` like the built-in ones.
"""
from __future__ import annotations

from incremental_jax.methods.base import Method, Phase, TaskContext, TaskInfo, snapshot  # noqa: F401
from incremental_jax.methods.baselines import Finetune, ICaRL, Joint, LwF
from incremental_jax.methods.lucir import Lucir
from incremental_jax.methods.podnet import PODNet
from incremental_jax.methods.bake import BAKE
from incremental_jax.methods.iekd import IEDML, IEKD, KD
from incremental_jax.methods.m2kd import M2KD, M2KDExemplars
from incremental_jax.registry import Registry

METHODS: Registry[type] = Registry('a method', {
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
}, hint=' (a method of your own joins them with incremental_jax.register_method)')


def register_method(name: str, cls: type, *, replace: bool = False) -> type:
  """Adds the `Method` subclass `cls` to the registry as `name` (the value of `method.name` that selects it).
  Registering a taken name raises ValueError unless `replace` (re-running a notebook cell re-registers).
  Returns `cls`, so it can decorate: `@functools.partial(register_method, 'my_method')`."""
  if not (isinstance(cls, type) and issubclass(cls, Method)):
    raise TypeError(f'register_method({name!r}, ...) needs a subclass of incremental_jax.methods.Method; got {cls!r}.')
  return METHODS.register(name, cls, replace=replace)


def method_class(name: str) -> type:
  """The registered class of `method.name`; `UnknownName` listing the valid names otherwise."""
  return METHODS.lookup(name, 'method.name')


def build_method(config, num_classes: int, image_shape: tuple[int, int, int]) -> Method:
  """The method of `config.method.name`, built for `num_classes` classes of images of `image_shape`."""
  return method_class(config.method.name)(config, num_classes, image_shape)
