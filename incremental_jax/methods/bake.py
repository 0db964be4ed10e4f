"""BAKE (Ge et al. 2021) as a classification method: cross-entropy plus the batch-knowledge-ensembling
self-distillation term (`losses.bake`), both over every image of the batch (anchors and same-class partners):

    L = CE(z, y) + r * T^2 * mean_i KL(Q_i || softmax(z_i / T)),   Q = (1 - w) (I - w A)^{-1} softmax(z / T)

Config: `method.temperature` (T, default 4), `method.omega` (w, 0.5), `method.weight` (r, 1). Meant for a single
task with every class (`data.increment = 0`) and the intra-class sampler (`data.sampler = 'intra_class'`); on an
incremental protocol it behaves as finetune + BAKE. To add BAKE to another method, name it in that method's
`method.aux_losses` instead (see `losses.auxiliary`).
"""
from __future__ import annotations

from incremental_jax.losses.bake import bake_term
from incremental_jax.methods.baselines import Finetune


class BAKE(Finetune):
  """Cross-entropy over the seen classes + `weight` * the BAKE term; no memory, no teacher."""
  hyperparameters = ('temperature', 'omega', 'weight')

  def loss(self, outputs, batch, task, teacher, params):
    ce, metrics = super().loss(outputs, batch, task, teacher, params)
    kd = bake_term(outputs, batch, task, teacher, params, temperature=self.hp(task, 'temperature'),
                   omega=self.hp(task, 'omega'))
    return ce + self.hp(task, 'weight') * kd, {**metrics, 'bake': kd}
