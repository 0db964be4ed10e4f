"""The baselines of a class-incremental results table: finetune (lower bound), joint (upper bound), LwF and
iCaRL."""
from __future__ import annotations

from incremental_jax.losses import cross_entropy, kd_kl, masked_mean, sigmoid_bce
from incremental_jax.methods.base import Method, TaskContext
import jax
import jax.numpy as jnp


class Finetune(Method):
  """Lower bound: cross-entropy over all seen classes on the new task's data only; no memory, no teacher."""

  def loss(self, outputs, batch, task, teacher, params):
    ce = masked_mean(cross_entropy(outputs['logits'], batch['label'], task.seen), batch.get('weight'))
    return ce, {'ce': ce}


class Joint(Finetune):
  """Upper bound: at every step, trains on the full training data of every class seen so far."""

  def train_indices(self, ctx: TaskContext):
    return ctx.seen_class_indices()


class LwF(Method):
  """Learning without Forgetting (Li & Hoiem, ECCV 2016) in its class-incremental form (as PyCIL): cross-entropy
  over the new classes' logits plus `kd_weight` times the temperature-`kd_temperature` distillation of the
  previous model's old-class logits (Eq. 2 of the paper, T = 2). No exemplars."""
  teacher = 'last'

  def loss(self, outputs, batch, task, teacher, params):
    logits, weights = outputs['logits'], batch.get('weight')
    ce = masked_mean(cross_entropy(logits, batch['label'], task.new), weights)
    if teacher is None:
      return ce, {'ce': ce}
    kd = masked_mean(kd_kl(logits, teacher['logits'], self.mcfg.kd_temperature, task.old), weights)
    return ce + self.mcfg.kd_weight * kd, {'ce': ce, 'kd': kd}


class ICaRL(Method):
  """iCaRL (Rebuffi et al., CVPR 2017): herding exemplars, distillation from the previous model, and
  nearest-mean-of-exemplars classification.

  `method.loss`:
    'ce_kd' (default, the form PyCIL and most recent tables use): cross-entropy over all seen classes plus
      `kd_weight` * KD(T=`kd_temperature`) of the old classes' logits;
    'bce' (the paper's Alg. 3): sigmoid binary cross-entropy over the seen classes with one-hot targets for
      the new classes and the previous model's sigmoid outputs as targets for the old classes.
  """
  uses_memory = True
  teacher = 'last'

  def loss(self, outputs, batch, task, teacher, params):
    logits, weights = outputs['logits'], batch.get('weight')
    if self.mcfg.loss == 'bce':
      onehot = jax.nn.one_hot(batch['label'], logits.shape[-1])
      targets = onehot if teacher is None else jnp.where(task.old[None] > 0, jax.nn.sigmoid(teacher['logits']), onehot)
      bce = masked_mean(sigmoid_bce(logits, targets, task.seen), weights)
      return bce, {'bce': bce}
    ce = masked_mean(cross_entropy(logits, batch['label'], task.seen), weights)
    if teacher is None:
      return ce, {'ce': ce}
    kd = masked_mean(kd_kl(logits, teacher['logits'], self.mcfg.kd_temperature, task.old), weights)
    return ce + self.mcfg.kd_weight * kd, {'ce': ce, 'kd': kd}
