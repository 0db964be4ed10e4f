"""Models: a backbone plus a classifier head, defined with flax.nnx and used functionally (`models.network`).

`build_model(model_cfg, num_classes, image_shape)` returns a `Model`: a pure `apply(params, batch_stats, x,
train, mask=None) -> (outputs, new_batch_stats)` over plain string-keyed dicts (`mask` [B]: the real examples of a
padded train batch, for BatchNorm's statistics), so training state, teachers and checkpoints are ordinary pytrees. `outputs` holds `stages`, `embedding`, `logits` and whatever the head adds.
"""
from incremental_jax.models.network import (BACKBONES, COMPUTE_DTYPES, HEADS, Classifier, Model, build_model,
                                            functional_model, layers_of, make_classifier)

__all__ = ['BACKBONES', 'COMPUTE_DTYPES', 'HEADS', 'Classifier', 'Model', 'build_model', 'functional_model',
           'layers_of', 'make_classifier']
