"""PODNet (Douillard et al., "PODNet: Pooled Outputs Distillation for Small-Tasks Incremental Learning", ECCV
2020), as the paper and its official code (arthurdouillard/incremental_learning.pytorch, `inclearn/models/
podnet.py` with `options/podnet/podnet_cnn_cifar100.yaml`) define it:

- the local similarity classifier (`model.head='lsc'`, `models.lsc`): K = 10 proxies per class, softmax-merged
  similarities, a learned scale eta (initial 1.0) used by the NCA loss;
- loss = NCA (scale eta; `method.nca`: the official code's form by default, the paper's Eq. 8 with margin 0.6,
  true class out of the denominator and hinge as an option) + sqrt(N/T) * (flat_weight *
  POD-flat + spatial_weight * POD-spatial) against the previous model (`losses.podnet`), with N the classes
  seen including the current task and T the new ones; only NCA on the first task;
- before each task t >= 1, the new classes' proxies are imprinted from k-means clusters of their normalised
  embeddings (`imprinted_proxies`); old classes' proxies get no update while the task trains;
- after the main training of a task t >= 1, class-balanced finetuning of all proxies (not eta, not the
  backbone) with NCA on the balanced exemplar memory, at a constant learning rate, with BatchNorm in training
  mode as the official code leaves it (`method.finetune_bn_train`);
- herding exemplars (20 per class), CNN and NME evaluation.

Deviations, each documented at its place: the POD maps are the outputs of our ResNet's stages (the CIFAR
ResNet-32 has 3 stages of 5 blocks; the official Rebuffi network splits the last block into a 4th stage and
drops every post-addition ReLU, ours only the last one); the official NCA form is the default because the
paper's (margin and hinge with a learned scale) collapses: the gradient drives eta below 0 (measured on digits,
see configs/podnet.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from incremental_jax import memory as memory_lib
from incremental_jax.losses import masked_mean
from incremental_jax.losses.lucir import less_forget
from incremental_jax.losses.podnet import (POOLINGS, adaptive_factor, nca, nca_official, perceptual_features,
                                           pod_spatial)
from incremental_jax.errors import ConfigError
from incremental_jax.methods.base import Method, Phase, TaskContext, with_imprinted_head
from incremental_jax.models import Model


@dataclasses.dataclass(frozen=True, eq=False)
class _TrainModeModel(Model):
  """The same network, every forward pass in training mode: BatchNorm normalises with the batch's statistics and
  returns updated running ones, whatever `train` the caller asks for (the update masks, not the mode, keep the
  backbone's parameters fixed)."""

  def apply(self, params, batch_stats, x, train: bool = False, **kwargs):
    del train
    return super().apply(params, batch_stats, x, train=True, **kwargs)


def in_train_mode(model: Model) -> Model:
  """`model` whose `apply` always runs in training mode (`_TrainModeModel`)."""
  return _TrainModeModel(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)})


def imprinted_proxies(kernel: np.ndarray, features: np.ndarray, labels: np.ndarray, new_classes: np.ndarray,
                      old_classes: np.ndarray, seed: int = 0) -> np.ndarray:
  """Proxy imprinting of new classes (official `weight_generation: imprinted, multi_class_diff: kmeans`).

  For every class c in `new_classes`, its K proxies (`kernel[:, c, :]`, kernel [D, C, K]) become the K k-means
  centres of the L2-normalised embeddings `features` [n, D] of its training images (`labels` [n]), not
  renormalised, times the mean L2 norm of all old classes' proxies. Returns a new kernel."""
  from sklearn.cluster import KMeans
  kernel = np.array(kernel, copy=True)
  k = kernel.shape[2]
  old = np.asarray(kernel[:, old_classes, :], np.float64)
  avg_norm = np.linalg.norm(old, axis=0).mean() if old.size else 1.0
  for c in new_classes:
    x = memory_lib.l2_normalize_rows(features[labels == c])
    if len(x) < k:
      raise ValueError(f'class {c} has {len(x)} training images, fewer than the {k} proxies per class.')
    centres = KMeans(n_clusters=k, n_init=10, random_state=seed + int(c)).fit(x).cluster_centers_
    kernel[:, c, :] = (centres.T * avg_norm).astype(kernel.dtype)
  return kernel


FINETUNE = 'balanced_finetune'   # the class-balanced finetuning phase's name


class PODNet(Method):
  """PODNet. `method` config fields:

    pooling: POD pooling ('spatial'; the ablation: channel, gap, width, height, pod_pixel = POD without pooling),
      or 'pixel': the official pixel ablation, `losses.podnet.perceptual_features` times pixel_weight (2 in the
      official `podnet_cnn_podFlat_podPixels_cifar100.yaml`) instead of POD-spatial, without sqrt(N/T);
    spatial_weight, flat_weight: base weights of POD-spatial and POD-flat (CIFAR 3 and 1; ImageNet 8 and 10);
    nca: 'official' (`losses.podnet.nca_official`) or 'paper' (`losses.podnet.nca` with nca_margin,
      nca_exclude_positive, nca_hinge: 0.6, True, True); learn_scale: train eta (True);
    imprint: imprint new proxies with k-means before each task t >= 1;
    finetune_epochs, finetune_lr: class-balanced finetuning after each task t >= 1 (20 epochs at 0.05 on
      CIFAR, 0.01 on ImageNet; 0 epochs disables it);
    finetune_bn_train: BatchNorm in training mode during that finetuning (True, as the official code: its
      `_train_task` puts the network in training mode and the finetuning loop never leaves it, so the classifier
      learns from batch-normalised features and the running statistics follow the memory's batches; the
      backbone's parameters stay fixed); False runs the backbone in inference mode.
  """
  uses_memory = True
  teacher = 'last'
  freeze_old_classes = True
  required_head = 'lsc'      # the local similarity classifier

  def check_config(self) -> None:
    if self.mcfg.pooling not in POOLINGS + ('pixel',):
      raise ConfigError(f'method.pooling={self.mcfg.pooling!r} is not a POD pooling; valid: '
                        f"{list(POOLINGS) + ['pixel']}.")

  # ---- traced -------------------------------------------------------------------------------------
  def classification_loss(self, outputs, batch, task, teacher, params):
    """NCA over the seen classes with the learned scale eta."""
    del teacher, params
    m = self.mcfg
    if m.nca == 'official':
      values = nca_official(outputs['logits'], batch['label'], task.seen, outputs['eta'])
    else:
      values = nca(outputs['logits'], batch['label'], task.seen, outputs['eta'], float(m.nca_margin),
                   bool(m.nca_exclude_positive), bool(m.nca_hinge))
    value = masked_mean(values, batch.get('weight'))
    return value, {'nca': value}

  def loss(self, outputs, batch, task, teacher, params):
    total, metrics = self.classification_loss(outputs, batch, task, teacher, params)
    if teacher is None:
      return total, metrics
    m, weights = self.mcfg, batch.get('weight')
    factor = adaptive_factor(1.0, task.seen, task.new)
    flat = masked_mean(less_forget(outputs['embedding'], teacher['embedding']), weights)
    if m.pooling == 'pixel':   # the official pixel ablation: its own factor, no adaptive weight
      pixel = perceptual_features(teacher['stages'], outputs['stages'], float(m.pixel_weight), weights)
      total = total + factor * float(m.flat_weight) * flat + pixel
      return total, {**metrics, 'pod_flat': flat, 'pixel': pixel, 'pod_factor': factor}
    spatial = pod_spatial(teacher['stages'], outputs['stages'], m.pooling, weights)
    total = total + factor * (float(m.flat_weight) * flat + float(m.spatial_weight) * spatial)
    return total, {**metrics, 'pod_flat': flat, 'pod_spatial': spatial, 'pod_factor': factor}

  def make_train_step(self, model, phase, augment_fn, has_teacher):
    """The default step; the balanced finetuning's (which runs no teacher) with the model in training mode when
    `method.finetune_bn_train`."""
    if phase.name == FINETUNE and self.mcfg.finetune_bn_train:
      model = in_train_mode(model)
    return super().make_train_step(model, phase, augment_fn, has_teacher)

  # ---- host-side hooks ----------------------------------------------------------------------------
  def phases(self, ctx: TaskContext) -> list[Phase]:
    if self.mcfg.learn_scale:
      return super().phases(ctx)
    return [dataclasses.replace(p, frozen_params=p.frozen_params + ('head/eta',)) for p in super().phases(ctx)]

  def before_task(self, ctx: TaskContext) -> TaskContext:
    if ctx.task == 0 or not self.mcfg.imprint:
      return ctx
    return with_imprinted_head(ctx, lambda *args: imprinted_proxies(*args, seed=int(ctx.config.seed)), 'podnet_imprint')

  def balancing_phases(self, ctx: TaskContext) -> list[Phase]:
    """Class-balanced finetuning of every seen class's proxies on the (balanced) exemplar memory, with NCA at
    a constant learning rate; eta and the backbone stay fixed."""
    epochs = int(self.mcfg.finetune_epochs)
    if ctx.task == 0 or epochs <= 0:
      return []
    optim = ctx.config.optim.copy_and_resolve_references()
    with optim.unlocked():
      optim.update(epochs=epochs, lr=float(self.mcfg.finetune_lr), schedule='constant', milestones=(),
                   warmup_epochs=0)
    return [Phase(FINETUNE, self.classification_loss, ctx.memory.indices(), optim,
                  train_backbone=False, use_teacher=False,
                  trainable_classes=ctx.scenario.class_masks(ctx.task)['seen'], frozen_params=('head/eta',))]
