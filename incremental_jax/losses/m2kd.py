"""M2KD losses (Zhou et al., "M2KD: Incremental Learning via Multi-model and Multi-level Knowledge Distillation",
BMVC 2020 / arXiv 1904.01769): L_total = CE + L_MM + lambda * L_AD.

The paper's equations could not be retrieved (no official code either; see the method's module docstring). What
the abstract states: distil from *all* earlier model snapshots, not only the last one (multi-model), and add an
auxiliary distillation of intermediate features (multi-level). The forms below are the defensible reading
(marked PROPOSAL where the paper may differ):

  multi-model (PROPOSAL form): L_MM = sum_{j < t} T^2 KL( softmax(z^(j)_{C_j} / T) || softmax(z_{C_j} / T) ),
    z^(j) the logits of snapshot j (frozen after task j), z the current model's, C_j the classes of task j
    ('group' domain) or every class snapshot j had seen, C_0 u ... u C_j ('seen' domain);
  auxiliary (PROPOSAL form): L_AD = mean over the chosen stages s of || f_s(x) / ||f_s(x)|| - g_s(x) / ||g_s(x)|| ||^2,
    f_s, g_s the current and the previous model's feature maps after stage s, flattened per example.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from incremental_jax.losses.classification import masked_mean
from incremental_jax.losses.distillation import kd_kl
from incremental_jax.models.heads import l2_normalize


def snapshot_class_masks(group_masks: jax.Array, domain: str = 'group') -> jax.Array:
  """The classes [S, C] each snapshot is distilled on: its own task's classes ('group'), or every class it had
  seen ('seen': the cumulative union of the groups up to it). `group_masks` [S, C]: snapshot j's task classes."""
  if domain == 'group':
    return group_masks
  if domain == 'seen':
    return jnp.minimum(jnp.cumsum(group_masks, axis=0), 1.0)
  raise ValueError(f"multi-model distillation domain must be 'group' or 'seen'; got {domain!r}.")


def multi_model_kd(student_logits: jax.Array, snapshot_logits: jax.Array, group_masks: jax.Array,
                   temperature: float, domain: str = 'group', reduction: str = 'sum',
                   valid: jax.Array | None = None) -> jax.Array:
  """Per-example multi-model distillation L_MM [B] (PROPOSAL form, see the module docstring).

  Args:
    student_logits: [B, C] the current model's logits.
    snapshot_logits: [S, B, C] the logits of the S frozen snapshots (snapshot j = the model after task j).
    group_masks: [S, C] float, the classes of task j in row j (the classes snapshot j learned as new).
    temperature: T; each term is multiplied by T^2 (Hinton et al.).
    domain: 'group' (snapshot j supervises its own task's classes) or 'seen' (every class it had seen).
    reduction: 'sum' over snapshots (each class group weighted equally) or 'mean' (divided by S).
    valid: optional [S] float, 1 for the stored snapshots (the first ones) and 0 for empty slots of a
      fixed-size stack, which contribute nothing (S then counts the valid ones).
  """
  masks = snapshot_class_masks(group_masks, domain)
  per_snapshot = jax.vmap(lambda t, m: kd_kl(student_logits, t, temperature, m))(snapshot_logits, masks)  # [S, B]
  per_snapshot = temperature ** 2 * per_snapshot
  count = per_snapshot.shape[0]
  if valid is not None:
    per_snapshot = jnp.where(valid[:, None] > 0, per_snapshot, 0.0)
    count = jnp.sum(valid)
  if reduction == 'sum':
    return per_snapshot.sum(0)
  if reduction == 'mean':
    return per_snapshot.sum(0) / count
  raise ValueError(f"multi-model distillation reduction must be 'sum' or 'mean'; got {reduction!r}.")


def feature_distillation(student_stages: Sequence[jax.Array], teacher_stages: Sequence[jax.Array],
                         stages: Sequence[int] = ()) -> jax.Array:
  """Per-example auxiliary (multi-level) feature distillation L_AD [B] (PROPOSAL form): the mean over `stages`
  (indices into the stage tuples; () = all) of the squared distance between the per-example L2-normalised
  flattened feature maps [B, H, W, C] of the student and the teacher (each term in [0, 4])."""
  chosen = tuple(stages) or tuple(range(len(student_stages)))
  terms = []
  for s in chosen:
    f = l2_normalize(student_stages[s].reshape(student_stages[s].shape[0], -1))
    g = l2_normalize(teacher_stages[s].reshape(teacher_stages[s].shape[0], -1))
    terms.append(((f - g) ** 2).sum(-1))
  return jnp.stack(terms).mean(0)


def feature_kd_term(outputs: dict, batch: dict, task, teacher, params, *, stages: Sequence[int] = ()) -> jax.Array:
  """Auxiliary loss term (`losses.auxiliary`, name 'feature_kd'): the mean over the batch's real examples
  (`batch['weight']`, when present) of `feature_distillation` between the model's `stages` and the teacher's (the
  previous model's for M2KD; the last snapshot for any method with a 'last' teacher); 0 while there is no teacher
  (the first task)."""
  del task, params
  if teacher is None:
    return jnp.zeros((), jnp.float32)
  return masked_mean(feature_distillation(outputs['stages'], teacher['stages'], stages), batch.get('weight'))
