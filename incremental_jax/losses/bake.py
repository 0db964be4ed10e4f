"""BAKE: self-distillation with batch knowledge ensembling (Ge et al., "Self-distillation with Batch Knowledge
Ensembling Improves ImageNet Classification", 2021).

Every image of a batch gets a soft target made from the predictions of the *other* images of the same batch,
weighted by feature similarity and propagated to convergence:

    affinity     A_ij = exp(f_i . f_j) / sum_{k != i} exp(f_i . f_k)   (i != j),  A_ii = 0,  f = L2-normalised
    predictions  P_i  = softmax(z_i / T)
    propagation  Q^(t+1) = w A Q^(t) + (1 - w) P,   Q^(0) = P
    closed form  Q = lim Q^(t) = (1 - w) (I - w A)^{-1} P
    loss         L_BAKE = r * T^2 * mean_i KL(Q_i || softmax(z_i / T))

with no gradient through Q (it is a target). Defaults of the official code: T = 4, w = 0.5, r = 1. The affinity
has no temperature. A is computed over the *global* batch: under `jax.jit` on a mesh with `Auto` axes a
batch-sharded [B, D] input gives a global [B, B] affinity (the compiler inserts the all-gather), like the
official ImageNet code's `all_gather` of features and predictions (`GLOBAL_KE`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from incremental_jax.losses.classification import masked_logits, masked_mean

_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes in the [B, B] products (GPU/TPU defaults)


def batch_affinity(embeddings: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """The row-stochastic affinity A [B, B] of a batch of embeddings [B, D]: row-softmax of the dot products of
  the L2-normalised embeddings, with the diagonal excluded (A_ii = 0; each sample gets no weight from itself).
  The diagonal is masked before the softmax (as the official code's -1e9 * I), so each row sums to 1.

  `weights` [B] (0 for the padding of a last partial batch): padded examples give no affinity (their columns are
  masked before the softmax, below the diagonal's mask) and receive none (their rows are 0), so the real rows
  are the affinity of the real examples alone."""
  f = embeddings.astype(jnp.float32)
  f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
  sim = jnp.matmul(f, f.T, precision=_HIGHEST)
  lowest = jnp.finfo(sim.dtype).min
  eye = jnp.eye(sim.shape[0], dtype=bool)
  if weights is None:
    return jax.nn.softmax(jnp.where(eye, lowest, sim), axis=-1)
  real = weights > 0
  # The diagonal at lowest / 2 and padding at lowest: exp underflows to 0 for both next to any real column, and a
  # row with no other real example puts its weight on itself, as a batch of that one example would.
  logits = jnp.where(real[None, :], jnp.where(eye, lowest / 2, sim), lowest)
  return jnp.where(real[:, None], jax.nn.softmax(logits, axis=-1), 0.0)


def propagate(affinity: jax.Array, predictions: jax.Array, omega: float) -> jax.Array:
  """Knowledge ensembling in closed form: Q = (1 - w) (I - w A)^{-1} P [B, C], the fixed point of
  Q = w A Q + (1 - w) P, computed by solving (I - w A) Q = (1 - w) P (no explicit inverse). For a
  row-stochastic A and 0 <= w < 1, I - w A is strictly diagonally dominant (invertible) and each row of Q is a
  convex combination of rows of P."""
  b = affinity.shape[0]
  system = jnp.eye(b, dtype=affinity.dtype) - omega * affinity
  return jnp.linalg.solve(system, (1.0 - omega) * predictions)


def soft_targets(embeddings: jax.Array, logits: jax.Array, temperature: float = 4.0, omega: float = 0.5,
                 class_mask: jax.Array | None = None, weights: jax.Array | None = None) -> jax.Array:
  """BAKE's ensembled soft targets Q [B, C] (no gradient): propagate(batch_affinity(f, weights), softmax(z / T),
  w). Classes where `class_mask` [C] is 0 (unseen in incremental learning) get probability 0; examples where
  `weights` [B] is 0 (padding) neither give nor receive affinity, so the real examples' targets are those of
  the batch of real examples alone (the padded rows are (1 - w) softmax(z / T), and unused)."""
  embeddings, logits = jax.lax.stop_gradient(embeddings), jax.lax.stop_gradient(logits)
  if class_mask is not None:
    logits = masked_logits(logits, class_mask)
  predictions = jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return jax.lax.stop_gradient(propagate(batch_affinity(embeddings, weights), predictions, omega))


def bake_loss(embeddings: jax.Array, logits: jax.Array, temperature: float = 4.0, omega: float = 0.5,
              class_mask: jax.Array | None = None, weights: jax.Array | None = None) -> jax.Array:
  """Per-example BAKE distillation [B]: T^2 * KL(Q_i || softmax(z_i / T)) with Q = `soft_targets(...)` held
  constant (not multiplied by the weight r; callers do). Its gradient with respect to the logits is
  T * (softmax(z_i / T) - Q_i). Every image of the batch (anchors and same-class partners) gets the term;
  `weights` [B] (0: padding) leave padded examples out of the affinity (reduce with `masked_mean(.., weights)`)."""
  q = soft_targets(embeddings, logits, temperature, omega, class_mask, weights)
  z = logits if class_mask is None else masked_logits(logits, class_mask)
  log_p = jax.nn.log_softmax(z.astype(jnp.float32) / temperature, axis=-1)
  terms = jax.scipy.special.xlogy(q, q) - q * log_p   # q log q - q log p, with 0 log 0 = 0
  if class_mask is not None:
    terms = jnp.where(class_mask > 0, terms, 0.0)
  return temperature ** 2 * terms.sum(-1)


def bake_term(outputs: dict, batch: dict, task, teacher, params, *, temperature: float = 4.0,
              omega: float = 0.5) -> jax.Array:
  """The BAKE term of a training step (an auxiliary loss term, see `losses.auxiliary`): the mean of `bake_loss` on
  the model's `embedding` and `logits` over the batch's real examples (`batch['weight']`, when present), over the
  classes seen so far (`task.seen`)."""
  del teacher, params
  weights = batch.get('weight')
  return masked_mean(bake_loss(outputs['embedding'], outputs['logits'], temperature, omega, task.seen, weights),
                     weights)
