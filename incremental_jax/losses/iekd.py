"""IE-KD losses (Huang et al., "Revisiting Knowledge Distillation: An Inheritance and Exploration Framework",
CVPR 2021) on factors, plus the factor autoencoder's reconstruction loss (Factor Transfer, Kim et al. 2018).

Factors are compared after flattening each example's factor [H, W, F] and L2-normalising it (as
`F.normalize(x.view(B, -1))` in both releases); the layout (NHWC here, NCHW in PyTorch) does not change any
value. Every function returns per-example values [B]; the batch mean equals the releases' mean over all B*D
elements.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from incremental_jax.models.heads import l2_normalize


def normalized_factor(factor: jax.Array) -> jax.Array:
  """F / ||F||_2 per example: [B, ...] -> [B, D] (eps 1e-12 as torch's F.normalize)."""
  return l2_normalize(factor.reshape(factor.shape[0], -1).astype(jnp.float32), axis=-1)


def _check_shapes(student_factor: jax.Array, teacher_factor: jax.Array) -> None:
  if student_factor.shape != teacher_factor.shape:
    raise ValueError(f'student factor {student_factor.shape} and teacher factor {teacher_factor.shape} differ: '
                     'the two networks need last-stage maps of the same spatial size (e.g. both CIFAR ResNets, '
                     'or both ImageNet ResNets at the same input size).')


def factor_l1_distance(student_factor: jax.Array, teacher_factor: jax.Array) -> jax.Array:
  """(1/D) || F_S/||F_S||_2 - F_T/||F_T||_2 ||_1 per example [B] (Factor Transfer's loss; IE-KD `FTLoss`)."""
  _check_shapes(student_factor, teacher_factor)
  return jnp.abs(normalized_factor(student_factor) - normalized_factor(teacher_factor)).mean(-1)


def factor_cosine(student_factor: jax.Array, teacher_factor: jax.Array) -> jax.Array:
  """cos(F_S, F_T) per example [B], over the flattened factors."""
  _check_shapes(student_factor, teacher_factor)
  return (normalized_factor(student_factor) * normalized_factor(teacher_factor)).sum(-1)


def inheritance_loss(inherit_factor: jax.Array, teacher_factor: jax.Array, measure: str = 'l1') -> jax.Array:
  """L_inh [B]: the inheritance factor is pulled towards the teacher's factor.

  'l1' (paper and release): || F_inh/||F_inh||_2 - F_T/||F_T||_2 ||_1, averaged over the D elements;
  'cosine' (release `CosLoss`): 1 - cos(F_inh, F_T).
  """
  if measure == 'l1':
    return factor_l1_distance(inherit_factor, teacher_factor)
  if measure == 'cosine':
    return 1.0 - factor_cosine(inherit_factor, teacher_factor)
  raise ValueError(f"method.inherit_measure must be 'l1' or 'cosine'; got {measure!r}.")


def exploration_loss(explore_factor: jax.Array, teacher_factor: jax.Array, measure: str = 'l1') -> jax.Array:
  """L_exp [B]: the exploration factor is pushed away from the teacher's factor.

  'l1' (paper and release `NormLoss(negative=True)`): - || F_exp/||F_exp||_2 - F_T/||F_T||_2 ||_1, averaged over
  the D elements (bounded: the distance of two unit vectors is at most 2/sqrt(D) per element on average);
  'cosine' (the alternative measure, release `CosLoss(negative=True)`): |cos(F_exp, F_T)|, minimal when the
  factors are orthogonal (equal to -(1 - |cos|) up to a constant).
  """
  if measure == 'l1':
    return -factor_l1_distance(explore_factor, teacher_factor)
  if measure == 'cosine':
    return jnp.abs(factor_cosine(explore_factor, teacher_factor))
  raise ValueError(f"method.explore_measure must be 'l1' or 'cosine'; got {measure!r}.")


def reconstruction_loss(reconstruction: jax.Array, feature: jax.Array, kind: str = 'l1') -> jax.Array:
  """The autoencoder's reconstruction error per example [B], averaged over the feature map's elements:
  'l1' mean |x - x_hat| (the IE-KD and Factor Transfer releases, `RecLoss` / `nn.L1Loss`); 'l2' mean
  (x - x_hat)^2 (the papers' squared norm, per element)."""
  diff = (reconstruction - feature).reshape(feature.shape[0], -1).astype(jnp.float32)
  if kind == 'l1':
    return jnp.abs(diff).mean(-1)
  if kind == 'l2':
    return jnp.square(diff).mean(-1)
  raise ValueError(f"method.reconstruction must be 'l1' or 'l2'; got {kind!r}.")
