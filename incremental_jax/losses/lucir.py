"""LUCIR's losses (Hou et al., "Learning a Unified Classifier Incrementally via Rebalancing", CVPR 2019):
the less-forget constraint with its adaptive weight (Sec. 3.3, Eqs. 6-7) and the inter-class separation
margin ranking loss (Sec. 3.4, Eq. 8), as the official code computes them
(`utils_incremental/incremental_train_and_eval_MR_LF.py`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from incremental_jax.losses.classification import masked_logits
from incremental_jax.models.heads import l2_normalize


def less_forget(embedding: jax.Array, old_embedding: jax.Array) -> jax.Array:
  """Less-forget constraint (Eq. 6) [B]: 1 - cos(f*(x), f(x)) between the frozen previous model's embedding
  `old_embedding` [B, D] and the current one `embedding` [B, D] (torch's CosineEmbeddingLoss with target 1,
  averaged over the whole batch by the caller)."""
  return 1.0 - (l2_normalize(embedding) * l2_normalize(jax.lax.stop_gradient(old_embedding))).sum(-1)


def adaptive_lambda(lambda_base: float, old: jax.Array, new: jax.Array) -> jax.Array:
  """The adaptive weight of the less-forget constraint (Eq. 7): lambda_base * sqrt(|C_old| / |C_new|), from
  the float class masks `old` and `new` [C] of the task (traced: a new task does not recompile). The official
  code (`class_incremental_cosine_cifar100.py`, `cur_lamda = lamda * sqrt(lamda_mult)`) uses the number of old
  over new classes, as here; with no old class the weight is 0."""
  num_old, num_new = old.sum(), new.sum()
  return lambda_base * jnp.sqrt(num_old / jnp.maximum(num_new, 1.0))


def hard_negative_cosines(cosine: jax.Array, new: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The top-`k` cosines [B, k] among the classes where `new` [C] is 1 (LUCIR's hard negatives: the most
  similar new classes), and a [B, k] float mask that is 0 where fewer than `k` new classes exist."""
  top = jax.lax.top_k(masked_logits(cosine, new), k)[0]
  valid = (jnp.arange(k) < new.sum()).astype(cosine.dtype)
  return jnp.where(valid[None] > 0, top, 0.0), jnp.broadcast_to(valid[None], top.shape)


def margin_ranking(cosine: jax.Array, labels: jax.Array, old: jax.Array, new: jax.Array, k: int = 2,
                   margin: float = 0.5, weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Inter-class separation (Eq. 8), per example: for a sample of an old class, the mean over its top-`k`
  new-class cosines of max(0, m - <w_bar_y, f_bar(x)> + <w_bar_k, f_bar(x)>), on the unscaled cosines
  `cosine` [B, C].

  Returns (values [B], weights [B]): weights are 1 for samples whose label is an old class (`old` [C]) and 0
  otherwise (their value is 0 too). `masked_mean(values, weights)` is the official reduction: torch's
  MarginRankingLoss averaged over the (old-class sample, hard negative) pairs of the batch, 0 when the batch
  has no old-class sample. Pairs beyond the number of new classes (k > |C_new|) are left out. The input
  `weights` [B] (0 for the padding of a last partial batch), when given, multiply the returned ones: padded
  samples are no old-class samples of the batch.
  """
  is_old = jnp.take(old, labels).astype(cosine.dtype)
  if weights is not None:
    is_old = is_old * (weights > 0).astype(cosine.dtype)
  positive = jnp.take_along_axis(cosine, labels[:, None], axis=-1)
  negatives, valid = hard_negative_cosines(cosine, new, k)
  pairs = jax.nn.relu(margin - positive + negatives) * valid
  values = pairs.sum(-1) / jnp.maximum(valid.sum(-1), 1.0)
  return values * is_old, is_old

