"""Logit distillation (Hinton et al. 2015; LwF, Li & Hoiem 2016)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from incremental_jax.losses.classification import masked_logits


def kd_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float,
          class_mask: jax.Array | None = None) -> jax.Array:
  """KL( softmax(t / T) || softmax(s / T) ) [B] over the classes in `class_mask` [C] (all when None).

  Not multiplied by T^2: callers that follow Hinton et al. multiply by T^2 themselves; LwF and iCaRL (as in
  PyCIL) use the plain value. The teacher term is constant, so the gradient equals that of the soft
  cross-entropy -sum_c softmax(t/T)_c log softmax(s/T)_c.
  """
  if class_mask is not None:
    student_logits = masked_logits(student_logits, class_mask)
    teacher_logits = masked_logits(teacher_logits, class_mask)
  log_p_s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  log_p_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  p_t = jnp.exp(log_p_t)
  terms = p_t * (log_p_t - log_p_s)
  if class_mask is not None:
    terms = jnp.where(class_mask > 0, terms, 0.0)
  return terms.sum(-1)
