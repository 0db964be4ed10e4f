"""A method defined outside the package: LwF (Li & Hoiem, ECCV 2016) with a cosine-normalised classifier.

Everything a method is, in one file: its loss (a function of arrays, traced under jit), the teacher it needs
('last': the base class freezes a snapshot of the model after every task) and the head its loss reads. The
run loop, checkpoints, `num_runs` and multi-device training come from the library; registering the class
under a name is the only step that connects it:

    from examples.custom_method import cosine_lwf   # registers 'cosine_lwf'
    config.method.name = 'cosine_lwf'

Loss: cross-entropy over the new classes' scaled cosines (`logits` = sigma * cos, `models.cosine`) plus
`kd_weight` times the temperature-`kd_temperature` distillation of the previous model's old-class logits.
"""
from incremental_jax import register_method
from incremental_jax.losses import cross_entropy, kd_kl, masked_mean
from incremental_jax.methods import Method


class CosineLwF(Method):
  teacher = 'last'           # the base class snapshots the model after each task; the step passes its outputs
  required_head = 'cosine'   # checked when the method is built: model.head must be 'cosine'

  def loss(self, outputs, batch, task, teacher, params):
    logits, weights = outputs['logits'], batch.get('weight')   # weight 0: padding of a last partial batch
    ce = masked_mean(cross_entropy(logits, batch['label'], task.new), weights)
    if teacher is None:      # the first task has no previous model
      return ce, {'ce': ce}
    kd = masked_mean(kd_kl(logits, teacher['logits'], self.mcfg.kd_temperature, task.old), weights)
    return ce + self.mcfg.kd_weight * kd, {'ce': ce, 'kd': kd}


register_method('cosine_lwf', CosineLwF, replace=True)
