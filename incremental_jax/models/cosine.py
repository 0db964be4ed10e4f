"""Cosine-normalised classifier (LUCIR, Hou et al., CVPR 2019, Sec. 3.2, Eq. 4).

    p_c(x) = exp(sigma <w_c_bar, f_bar(x)>) / sum_j exp(sigma <w_j_bar, f_bar(x)>),

with `w_bar = w / ||w||` and `f_bar = f / ||f||`: the logits are `sigma * cos(w_c, f(x))`, so the magnitudes of
the class weights and of the features no longer bias the prediction towards the classes of the last task.
The official code (`modified_linear.CosineLinear`) initialises the weights as `nn.Linear` does
(U(-1/sqrt(D), 1/sqrt(D))) and the learnable scale sigma to 1; sigma is carried over from task to task and
trained with the backbone's learning rate and weight decay.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from incremental_jax.models.heads import l2_normalize


def cosine_logits(embedding: jax.Array, kernel: jax.Array) -> jax.Array:
  """cos(w_c, f) [B, C] of embeddings [B, D] and class weights `kernel` [D, C] (each normalised with
  `l2_normalize`, i.e. torch's F.normalize)."""
  return l2_normalize(embedding, axis=-1) @ l2_normalize(kernel, axis=0)


class CosineHead(nnx.Module):
  """Logits `sigma * cos(w_c, f(x))` over all classes; the output dict also holds the unscaled cosines
  (`cosine`, in [-1, 1]), which LUCIR's margin ranking loss compares.

  Args:
    in_features: embedding size D.
    num_classes: classes C (the whole scenario; unseen ones are masked by the losses).
    learn_sigma: a learnable scale sigma (True, as LUCIR); False gives plain cosines.
    sigma_init: the initial sigma (1.0 in the official code).
  """
  class_axes = {'kernel': -1}

  def __init__(self, in_features: int, num_classes: int, *, rngs: nnx.Rngs, learn_sigma: bool = True,
               sigma_init: float = 1.0):
    bound = 1.0 / in_features**0.5
    init = nnx.initializers.uniform(2 * bound)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, num_classes)) - bound)
    self.sigma = nnx.Param(jnp.asarray(sigma_init, jnp.float32)) if learn_sigma else None

  def __call__(self, x: jax.Array) -> dict:
    cosine = cosine_logits(x, self.kernel[...])
    logits = cosine * self.sigma[...] if self.sigma is not None else cosine
    return {'logits': logits, 'cosine': cosine}
