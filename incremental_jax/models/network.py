"""Networks: a backbone plus a classifier head, defined with flax.nnx and used functionally.

`build_model(model_cfg, num_classes, image_shape)` returns a `Model`: a pure `apply(params, batch_stats, x,
train, mask=None) -> (outputs, new_batch_stats)` over plain string-keyed dicts (`mask` [B]: the real examples of a
padded train batch, for BatchNorm's statistics), so training state, teachers and checkpoints are ordinary pytrees. `outputs` holds `stages`, `embedding`, `logits` and whatever the head adds.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from incremental_jax import backend_tuning
from incremental_jax.models import cosine as cosine_lib
from incremental_jax.models import lsc as lsc_lib
from incremental_jax.models import heads as heads_lib
from incremental_jax.models import rebuffi
from incremental_jax.models import resnet
from incremental_jax.registry import Registry

BACKBONES: Registry[Callable[..., nnx.Module]] = Registry('a backbone', {
    'cifar_resnet': resnet.cifar_resnet,
    'resnet': resnet.imagenet_resnet,
    'rebuffi': rebuffi.rebuffi_resnet,   # PODNet's CIFAR ResNet-32 (four POD maps, no post-addition ReLU)
})


HEADS: Registry[Any] = Registry('a head', {
    'linear': heads_lib.LinearHead,
    'cosine': cosine_lib.CosineHead,
    'lsc': lsc_lib.LocalSimilarityHead,
})


class Classifier(nnx.Module):
  """Backbone followed by a head; returns the backbone's outputs with the head's added."""

  def __init__(self, backbone: nnx.Module, head: nnx.Module):
    self.backbone, self.head = backbone, head

  def __call__(self, x: jax.Array, train: bool = False, mask: Optional[jax.Array] = None) -> dict:
    out = dict(self.backbone(x, train=train) if mask is None else self.backbone(x, train=train, mask=mask))
    out.update(self.head(out['embedding']))
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """A functional view of an nnx module: `init_variables` gives fresh parameter dicts, `apply` is pure.

  Attributes:
    graphdef: the module's static structure.
    params_template, stats_template: abstract nnx.State of the variables (structure, shapes and dtypes).
    head_class_axes: {param name: class axis} of the head's class-indexed parameters.
    num_classes: classes of the head.
    embedding_dim: size of the embedding.
    initializer: a jitted function returning the initial (params, batch_stats) as pure dicts.
  """
  graphdef: Any
  params_template: Any
  stats_template: Any
  head_class_axes: dict
  num_classes: int
  embedding_dim: int
  initializer: Callable[[], tuple[dict, dict]]

  def init_variables(self) -> tuple[dict, dict]:
    """The initial parameters and batch statistics, as pure dicts."""
    return self.initializer()

  def merge(self, params: dict, batch_stats: dict) -> nnx.Module:
    p = jax.tree.map(lambda v: v, self.params_template)
    s = jax.tree.map(lambda v: v, self.stats_template)
    nnx.replace_by_pure_dict(p, params)
    nnx.replace_by_pure_dict(s, batch_stats)
    return nnx.merge(self.graphdef, p, s, copy=True)

  def apply(self, params: dict, batch_stats: dict, x: jax.Array, train: bool = False,
            mask: Optional[jax.Array] = None) -> tuple[dict, dict]:
    """Forward pass. In training mode BatchNorm uses batch statistics and returns the updated running ones.

    `mask` [B] (bool), training mode only: the real examples of a batch padded to its compiled size (PyTorch's
    last partial batch); BatchNorm's batch statistics, and the running ones, come from them alone
    (`resnet.batch_norm`). None (every example real) calls the module without it, the same program as before
    masks existed; a module given a mask must take `mask` in its `__call__(x, train, mask)`."""
    module = self.merge(params, batch_stats)
    out = module(x, train=train) if mask is None else module(x, train=train, mask=mask)
    new_stats = nnx.to_pure_dict(nnx.state(module, nnx.BatchStat)) if train else batch_stats
    return out, new_stats

  def batch_statistics(self, params: dict, batch_stats: dict, x: jax.Array,
                       mask: Optional[jax.Array] = None) -> dict:
    """Every BatchNorm layer's statistics of this batch alone, as a tree shaped like `batch_stats`: the mean and
    the variance that a training-mode `apply` folds into the running statistics (the unbiased variance for layers
    that update as PyTorch's BatchNorm2d does, `resnet.TorchBatchNorm`; of the real examples with `mask`). They come from the training-mode forward
    pass with every layer's momentum set to 0 (flax's convention; PyTorch's 1.0, as pycls's
    `compute_precise_bn_stats` sets it), so each running statistic is replaced by the batch's own: exactly,
    since 0 * running + 1 * batch is the batch's value whatever the (finite) running one."""
    module = self.merge(params, batch_stats)
    for _, layer in nnx.iter_modules(module):
      if isinstance(layer, nnx.BatchNorm):
        layer.momentum = 0.0
    if mask is None:
      module(x, train=True)
    else:
      module(x, train=True, mask=mask)
    return nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))


def functional_model(construct: Callable[[], nnx.Module], head_class_axes: dict, num_classes: int,
                     embedding_dim: int) -> Model:
  """Wraps a module constructor: the structure is traced abstractly (no eager initialisation, which compiles
  every initializer separately) and the variables are created by one jitted call."""
  abstract = nnx.eval_shape(construct)
  graphdef, params, stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)

  def initialize():
    _, p, s = nnx.split(construct(), nnx.Param, nnx.BatchStat)
    return nnx.to_pure_dict(p), nnx.to_pure_dict(s)

  return Model(graphdef=graphdef, params_template=params, stats_template=stats, head_class_axes=head_class_axes,
               num_classes=num_classes, embedding_dim=embedding_dim, initializer=jax.jit(initialize))


COMPUTE_DTYPES: Registry[Any] = Registry('a compute dtype', {'float32': None, 'bfloat16': jnp.bfloat16})


def layers_of(model_cfg, backend: Optional[str] = None) -> resnet.Layers:
  """The backbone's `Layers`: `model.dtype` (compute dtype 'float32' or 'bfloat16'; parameters, batch
  statistics, heads and losses stay float32), `model.bn_running_var` (BatchNorm's running-variance update,
  `resnet.BATCH_NORMS`) and the convolution lowering `backend_tuning` gives the backend (default: JAX's default
  backend)."""
  dtype = COMPUTE_DTYPES.lookup(str(model_cfg.dtype), 'model.dtype')
  resnet.BATCH_NORMS.lookup(str(model_cfg.bn_running_var), 'model.bn_running_var')
  lowering = backend_tuning.conv_lowering(backend or jax.default_backend())
  return resnet.Layers(conv_lowering=lowering, dtype=dtype, bn_running_var=str(model_cfg.bn_running_var))


def _backbone_kwargs(model_cfg) -> dict:
  kw = dict(depth=int(model_cfg.depth), width=int(model_cfg.width), last_relu=bool(model_cfg.last_relu),
            shortcut=str(model_cfg.shortcut), layers=layers_of(model_cfg))
  if model_cfg.backbone == 'resnet':
    kw['stem'] = str(model_cfg.stem)
  return kw


def make_classifier(model_cfg, num_classes: int, image_shape: tuple[int, int, int], rngs: nnx.Rngs) -> Classifier:
  """The `Classifier` (backbone + head) of `model_cfg`, created eagerly with `rngs` (call it inside a
  `functional_model` constructor, e.g. to build several networks into one module)."""
  backbone_fn = BACKBONES.lookup(model_cfg.backbone, 'model.backbone')
  backbone = backbone_fn(image_shape[-1], rngs=rngs, **_backbone_kwargs(model_cfg))
  head = HEADS.lookup(model_cfg.head, 'model.head')(backbone.embedding_dim, num_classes, rngs=rngs,
                                                    **dict(model_cfg.head_kwargs or {}))
  return Classifier(backbone, head)


def build_model(model_cfg, num_classes: int, image_shape: tuple[int, int, int], seed: int = 0,
                extend: Optional[Callable[[Classifier, nnx.Rngs], nnx.Module]] = None) -> Model:
  """Builds the network named by `model_cfg.backbone` with head `model_cfg.head` over `num_classes` classes.

  Backbone fields: `depth`, `width`, `last_relu`, `shortcut`, `stem` (resnet only), `dtype`. Head options come
  from `model_cfg.head_kwargs` (a dict). `extend(classifier, rngs)`, when given, returns the module actually
  trained (the classifier's `backbone` and `head` plus extra trainable modules, e.g. IE-KD's encoders); its
  `__call__(x, train, mask=None)` must return the classifier's outputs (and may add its own), passing `mask` on to
  its BatchNorm layers (`resnet.batch_norm`).
  """
  backbone_fn = BACKBONES.lookup(model_cfg.backbone, 'model.backbone')
  kw = _backbone_kwargs(model_cfg)
  head_cls = HEADS.lookup(model_cfg.head, 'model.head')

  def construct():
    # The 'rbg' generator compiles ~8x faster than threefry on CPU; initialisation runs once, replicated.
    rngs = nnx.Rngs(params=jax.random.key(seed, impl='rbg'))
    classifier = make_classifier(model_cfg, num_classes, image_shape, rngs)
    return classifier if extend is None else extend(classifier, rngs)

  embedding_dim = nnx.eval_shape(lambda: backbone_fn(image_shape[-1], rngs=nnx.Rngs(0), **kw)).embedding_dim
  return functional_model(construct, dict(head_cls.class_axes), num_classes, embedding_dim)
