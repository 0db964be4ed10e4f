"""PODNet's losses (Douillard et al., "PODNet: Pooled Outputs Distillation for Small-Tasks Incremental Learning",
ECCV 2020), as the official code (arthurdouillard/incremental_learning.pytorch, `inclearn/lib/losses`) computes
them, with feature maps in NHWC layout:

- POD (Sec. 3.1, Eqs. 2-5): every stage output h of the old and the new model is squared element-wise, pooled
  (`pod_pool`), L2-normalised per example, and compared with the (non-squared) Euclidean distance; the batch
  mean of each stage's distance is averaged over the stages (`pod_spatial`);
- POD-flat (Eq. 6): 1 - cos between the old and the new final embedding, the same quantity as LUCIR's
  less-forget constraint (`losses.lucir.less_forget`);
- the adaptive weight sqrt(N / T) of both (N classes seen including the current task, T new ones);
- the "pixel" ablation of the paper's Table 3b as the official code computes it (`perceptual_features`, the
  official `perceptual_features_reconstruction`): not POD with no pooling (that one is `pod_pool(.., 'pod_pixel')`);
- NCA on the local similarity classifier's scores (Eq. 8, `nca`).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from incremental_jax.losses.classification import masked_logits, masked_mean
from incremental_jax.models.heads import l2_normalize

POOLINGS = ('pod_pixel', 'channel', 'gap', 'width', 'height', 'spatial')


def pod_pool(h: jax.Array, pooling: str = 'spatial') -> jax.Array:
  """The pooled vector [B, n] of a (squared) feature map `h` [B, H, W, C] (paper Fig. 3 / Table 3b):

    pod_pixel  no pooling: the whole map flattened (H*W*C); POD with this pooling is not the official pixel
             ablation (`perceptual_features`);
    channel  sum over channels (H*W);
    gap      mean over height and width (C);
    width    sum over the height axis: one C-vector per column (W*C), the paper's POD-width;
    height   sum over the width axis: one C-vector per row (H*C), POD-height;
    spatial  width and height concatenated (W*C + H*C), PODNet's default; the two share one normalisation, as
             in the official code's `collapse_channels='spatial'`.
  """
  b = h.shape[0]
  if pooling == 'pod_pixel':
    return h.reshape(b, -1)
  if pooling == 'channel':
    return h.sum(axis=3).reshape(b, -1)
  if pooling == 'gap':
    return h.mean(axis=(1, 2))
  if pooling == 'width':
    return h.sum(axis=1).reshape(b, -1)
  if pooling == 'height':
    return h.sum(axis=2).reshape(b, -1)
  if pooling == 'spatial':
    return jnp.concatenate([h.sum(axis=1).reshape(b, -1), h.sum(axis=2).reshape(b, -1)], axis=-1)
  raise ValueError(f'pooling must be one of {POOLINGS}; got {pooling!r}.')


def pod_distance(old: jax.Array, new: jax.Array, pooling: str = 'spatial') -> jax.Array:
  """POD of one stage [B]: || n(P(old^2)) - n(P(new^2)) ||_2 with P = `pod_pool` and n the per-example L2
  normalisation. Squaring (not abs) removes the sign of the pre-ReLU activations, as the official code does."""
  a = l2_normalize(pod_pool(jnp.square(jax.lax.stop_gradient(old)), pooling))
  b = l2_normalize(pod_pool(jnp.square(new), pooling))
  return jnp.sqrt(jnp.maximum(jnp.square(a - b).sum(-1), 1e-24))


def pod_spatial(old_stages: Sequence[jax.Array], new_stages: Sequence[jax.Array], pooling: str = 'spatial',
                weights: jax.Array | None = None) -> jax.Array:
  """POD over all stages (scalar): the mean over stages of the batch mean of `pod_distance` (the official
  `pod(...)`: sum over stages of the batch mean, divided by the number of stages); every example counts, or with
  `weights` [B] (0 for padding) the real ones (`masked_mean`)."""
  if len(old_stages) != len(new_stages):
    raise ValueError(f'old and new models give {len(old_stages)} and {len(new_stages)} stage maps.')
  return sum(masked_mean(pod_distance(a, b, pooling), weights)
             for a, b in zip(old_stages, new_stages)) / len(new_stages)


def perceptual_features(old_stages: Sequence[jax.Array], new_stages: Sequence[jax.Array],
                        factor: float = 1.0, weights: jax.Array | None = None) -> jax.Array:
  """The official pixel-level distillation (scalar; arthurdouillard/incremental_learning.pytorch,
  `inclearn/lib/losses/distillation.py::perceptual_features_reconstruction`, the `podPixels` ablation of
  `options/podnet/ablations/perceptual_losses/`): per map of shape [B, H, W, C], with n the per-example L2
  normalisation of the flattened (unsquared) map,

      d = || n(old) - n(new) + 1e-6 ||_2^2 / (C H W)      (the 1e-6 is torch's pairwise_distance eps)

  averaged over the batch (its real examples with `weights` [B], 0 for padding), then over the maps, times
  `factor`. Unlike POD there is no squaring of the
  activations and no pooling, the distance is squared and divided by the map size, and the official code adds
  it without the adaptive weight sqrt(N/T)."""
  if len(old_stages) != len(new_stages):
    raise ValueError(f'old and new models give {len(old_stages)} and {len(new_stages)} stage maps.')
  total = 0.0
  for old, new in zip(old_stages, new_stages):
    b = new.shape[0]
    a = l2_normalize(jax.lax.stop_gradient(old).reshape(b, -1))
    n = l2_normalize(new.reshape(b, -1))
    total = total + masked_mean(jnp.square(a - n + 1e-6).sum(-1) / a.shape[-1], weights)
  return factor * total / len(new_stages)


def adaptive_factor(base: float, seen: jax.Array, new: jax.Array) -> jax.Array:
  """PODNet's distillation weight base * sqrt(N / T) from the float class masks `seen` (N = classes seen
  including the current task) and `new` (T = the current task's classes)."""
  return base * jnp.sqrt(seen.sum() / jnp.maximum(new.sum(), 1.0))


def nca(scores: jax.Array, labels: jax.Array, class_mask: jax.Array, scale: jax.Array | float = 1.0,
        margin: float = 0.6, exclude_positive: bool = True, hinge: bool = True) -> jax.Array:
  """NCA loss [B] on class scores `scores` [B, C] (the LSC's merged similarities; Eq. 8):

      L = [ -log( exp(eta (s_y - delta)) / sum_{c != y} exp(eta s_c) ) ]_+

  over the classes in `class_mask`, with the learned scale `scale` (eta), `margin` (delta) on the true class
  only, the true class left out of the denominator (`exclude_positive`; otherwise it stays in, with its margin)
  and hinged at zero (`hinge`). This is the loss the paper states. The official code subtracts the margin
  from every score, which cancels it (its issue #59); margin=0 with `exclude_positive` and no hinge is then
  close to, but not equal to, what the code computes."""
  onehot = jax.nn.one_hot(labels, scores.shape[-1], dtype=scores.dtype)
  positive = scale * ((scores * onehot).sum(-1) - margin)
  others = scale * scores
  if exclude_positive:
    denominator = jax.nn.logsumexp(masked_logits(others, class_mask * (1.0 - onehot)), axis=-1)
  else:
    denominator = jax.nn.logsumexp(masked_logits(others - scale * margin * onehot, class_mask), axis=-1)
  loss = denominator - positive
  return jax.nn.relu(loss) if hinge else loss


def nca_official(scores: jax.Array, labels: jax.Array, class_mask: jax.Array, scale: jax.Array | float = 1.0) -> jax.Array:
  """NCA [B] as the official code computes it (`inclearn/lib/losses/base.py::nca` with margin 0.6,
  `exclude_pos_denominator`, no hinge), in closed form: the margin subtracted from every score cancels, and the
  true class's denominator term becomes exp(eta * max_c s_c):

      L = -eta s_y + log( exp(eta max_c s_c) + sum_{c != y} exp(eta s_c) ),

  with the gradient flowing through the max. It is >= 0, and equals the cross-entropy of eta * s when y is the
  arg-max."""
  onehot = jax.nn.one_hot(labels, scores.shape[-1], dtype=scores.dtype)
  z = masked_logits(scale * scores, class_mask)
  top = z.max(axis=-1)
  others = jnp.where(onehot > 0, top[:, None], z)
  return jax.nn.logsumexp(others, axis=-1) - (z * onehot).sum(-1)
