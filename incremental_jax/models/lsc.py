"""PODNet's local similarity classifier (LSC; Douillard et al., ECCV 2020, Sec. 3.2, Eq. 7).

Each class c has K proxies theta_{c,k}. With normalised embedding f and proxies, the proxy similarity is the
official code's `neg_stable_cosine_distance`, -||f - theta||^2 = 2 cos - 2 (in [-4, 0]); the class score is the
softmax-weighted merge of its proxies' similarities,

    s_{c,k} = -|| n(f) - n(theta_{c,k}) ||^2,   s_c = sum_k softmax_k(gamma * s_{c,k}) s_{c,k},

with gamma = 1 and no bias. The learned scale eta (initial value 1.0; the official `FactorScalar`
post-processor) is not applied to the scores: the NCA loss multiplies by it, and CNN predictions (argmax of
the scores) do not depend on it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from incremental_jax.models.heads import l2_normalize


def proxy_similarities(embedding: jax.Array, proxies: jax.Array) -> jax.Array:
  """s_{c,k} [B, C, K] = -||n(f) - n(theta_{c,k})||^2 = 2 cos(f, theta_{c,k}) - 2, of embeddings [B, D] and
  proxies [D, C, K]; clamped at 0 from above like the official `stable_cosine_distance`."""
  cos = jnp.einsum('bd,dck->bck', l2_normalize(embedding), l2_normalize(proxies, axis=0))
  return jnp.minimum(2.0 * cos - 2.0, 0.0)


def merge_proxies(similarities: jax.Array, gamma: float = 1.0) -> jax.Array:
  """Class scores [B, C]: sum_k softmax_k(gamma * s_{c,k}) * s_{c,k} of proxy similarities [B, C, K]."""
  return (jax.nn.softmax(gamma * similarities, axis=-1) * similarities).sum(-1)


class LocalSimilarityHead(nnx.Module):
  """K proxies per class (`kernel` [D, C, K], class axis 1) and the scale `eta`. Returns `logits` (the merged
  class scores s_c), `proxy_logits` [B, C, K] and `eta`.

  Args:
    in_features: embedding size D.
    num_classes: classes C of the whole scenario (unseen ones are masked by the losses).
    proxies_per_class: K (10 in PODNet).
    gamma: the merge's inverse temperature (1).
    eta_init: the initial scale (1.0).
  """
  class_axes = {'kernel': 1}

  def __init__(self, in_features: int, num_classes: int, *, rngs: nnx.Rngs, proxies_per_class: int = 10,
               gamma: float = 1.0, eta_init: float = 1.0):
    # Kaiming normal with linear gain over fan-in D (the official first-task proxies).
    init = nnx.initializers.normal(stddev=1.0 / in_features**0.5)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, num_classes, proxies_per_class)))
    self.eta = nnx.Param(jnp.asarray(eta_init, jnp.float32))
    self.gamma = gamma

  def __call__(self, x: jax.Array) -> dict:
    sims = proxy_similarities(x, self.kernel[...])
    return {'logits': merge_proxies(sims, self.gamma), 'proxy_logits': sims, 'eta': self.eta[...]}
