"""LUCIR (Hou et al., "Learning a Unified Classifier Incrementally via Rebalancing", CVPR 2019), as its
official code (hshustc/CVPR19_Incremental_Learning, `class_incremental_cosine_cifar100.py` with
`--imprint_weights --less_forget --adapt_lamda --mr_loss`) trains it:

- a cosine-normalised classifier (`model.head='cosine'`, `models.cosine`) over a ResNet without its last ReLU;
- before each task t >= 1, the new classes' weights are imprinted (`imprinted_weights`);
- loss = cross-entropy over the seen classes + lambda * less-forget constraint + margin ranking loss
  (`losses.lucir`); old classes' weights get no update (`freeze_old_classes`), the scale sigma is trained with
  the backbone;
- herding exemplars (20 per class), CNN and NME evaluation;
- optionally (`method.cb_finetune`, off in the paper's CIFAR-100 and ImageNet-subset results, used by the
  official ImageNet-full run), class-balanced finetuning of the classifier on the exemplars afterwards.
"""
from __future__ import annotations


import jax.numpy as jnp
import numpy as np

from incremental_jax import memory as memory_lib
from incremental_jax.losses import cross_entropy, masked_mean
from incremental_jax.losses.lucir import adaptive_lambda, less_forget, margin_ranking
from incremental_jax.methods.base import Method, Phase, TaskContext, with_imprinted_head


def imprinted_weights(kernel: np.ndarray, features: np.ndarray, labels: np.ndarray, new_classes: np.ndarray,
                      old_classes: np.ndarray) -> np.ndarray:
  """Weight imprinting of new classes (LUCIR Sec. 3.2; official code, `--imprint_weights`).

  For every class c in `new_classes`, the column c of `kernel` [D, C] becomes the normalised mean of the
  normalised embeddings `features` [n, D] of its training images (`labels` [n]), rescaled to the mean L2 norm
  of the old classes' weight vectors (columns `old_classes`):

      w_c = mean_norm_old * normalize( mean_{x in c} normalize(f(x)) ).

  Returns a new kernel; the other columns are unchanged.
  """
  kernel = np.array(kernel, copy=True)
  old_norm = np.linalg.norm(np.asarray(kernel[:, old_classes], np.float64), axis=0).mean()
  for c in new_classes:
    mean = memory_lib.l2_normalize_rows(features[labels == c]).mean(0)
    kernel[:, c] = (memory_lib.l2_normalize_rows(mean[None])[0] * old_norm).astype(kernel.dtype)
  return kernel


class Lucir(Method):
  """LUCIR. `method` config fields:

    lambda_base: weight of the less-forget constraint (5 on CIFAR-100, 10 on ImageNet);
    adaptive_lambda: multiply it by sqrt(|C_old| / |C_new|) (Eq. 7);
    less_forget: use the less-forget constraint (Eq. 6);
    margin, num_hard_negatives, mr_weight: the margin ranking loss (Eq. 8: m = 0.5, K = 2, weight 1; weight 0
      disables it);
    imprint: imprint the new classes' weights before each task;
    cb_finetune: class-balanced finetuning on the exemplars after each task t >= 1, with the backbone and sigma
      frozen and every seen class's weights trained, for `cbf_epochs` epochs at `cbf_lr` (divided by 10 at
      `cbf_milestones`) with the run's momentum, weight decay and batch size (official ImageNet code:
      20 epochs, lr 0.01, milestone 10, `ft_flag=2`).
  """
  uses_memory = True
  teacher = 'last'
  freeze_old_classes = True
  required_head = 'cosine'   # the margin ranking loss reads the unscaled cosines

  # ---- traced -------------------------------------------------------------------------------------
  def loss(self, outputs, batch, task, teacher, params):
    labels, weights = batch['label'], batch.get('weight')
    ce = masked_mean(cross_entropy(outputs['logits'], labels, task.seen), weights)
    if teacher is None:
      return ce, {'ce': ce}
    m = self.mcfg
    total, metrics = ce, {'ce': ce}
    if m.less_forget:
      lam = adaptive_lambda(float(m.lambda_base), task.old, task.new) if m.adaptive_lambda \
          else jnp.float32(m.lambda_base)
      lc = masked_mean(less_forget(outputs['embedding'], teacher['embedding']), weights)
      total = total + lam * lc
      metrics.update(lc=lc, lambda_lc=lam)
    if float(m.mr_weight) > 0:
      values, old_samples = margin_ranking(outputs['cosine'], labels, task.old, task.new,
                                           int(m.num_hard_negatives), float(m.margin), weights)
      mr = masked_mean(values, old_samples)
      total = total + float(m.mr_weight) * mr
      metrics['mr'] = mr
    return total, metrics

  # ---- host-side hooks ----------------------------------------------------------------------------
  def before_task(self, ctx: TaskContext) -> TaskContext:
    if ctx.task == 0 or not self.mcfg.imprint:
      return ctx
    return with_imprinted_head(ctx, imprinted_weights, 'lucir_imprint')

  def balancing_phases(self, ctx: TaskContext) -> list[Phase]:
    if ctx.task == 0 or not self.mcfg.cb_finetune:
      return []
    optim = ctx.config.optim.copy_and_resolve_references()
    with optim.unlocked():
      optim.epochs = int(self.mcfg.cbf_epochs)
      optim.lr = float(self.mcfg.cbf_lr)
      optim.schedule = 'multistep'
      optim.milestones = tuple(self.mcfg.cbf_milestones)
      optim.warmup_epochs = 0
    return [Phase('balanced_finetune', self.loss, ctx.memory.indices(), optim, train_backbone=False,
                  trainable_classes=ctx.scenario.class_masks(ctx.task)['seen'], frozen_params=('head/sigma',))]
