"""M2KD (Zhou, Mai, Zhang, Xu, Wu, Davis, "M2KD: Incremental Learning via Multi-model and Multi-level Knowledge
Distillation", BMVC 2020; arXiv 1904.01769 "Multi-model and Multi-level Knowledge Distillation for Incremental
Learning").

What the paper's abstract states, and how it is built here:
  - multi-model distillation: every earlier model snapshot is a teacher, not only the last one. After task j the
    model is frozen as snapshot j; while learning task t, the current model's logits over the classes of task j
    are distilled from snapshot j, for every j < t (`losses.m2kd.multi_model_kd`; `method.teachers='last'` gives
    the sequential, LwF-style distillation from the last snapshot on all old classes, the paper's baseline).
    The snapshots share one architecture: they are stacked along a leading axis of fixed length (one slot per
    task, a validity mask marking the stored ones, so the step compiles once per run) and evaluated inside the
    step by one `lax.map` over the valid slots (`teacher_forward`), not a Python loop.
  - multi-level distillation: an auxiliary distillation of intermediate features of the previous model, the
    auxiliary loss term 'feature_kd' (`losses.m2kd.feature_kd_term`, configured in `method.aux_losses` with its own
    weight lambda), so that L_total = CE + L_MM + lambda * L_AD.
  - mask-based pruning: each stored snapshot keeps only its `prune_keep` fraction of largest-magnitude weights
    (`incremental_jax.pruning`), stored as values + a packed bit mask; the stacked *stored* form is the frozen
    pytree (and what is checkpointed), and the teacher forward rebuilds the masked weights inside the step.
    Bytes kept against the dense size are in `method_state['snapshot_bytes']` and `<workdir>/m2kd_snapshots.json`.

No official code exists and the paper body (equations, hyperparameters, tables) could not be retrieved: the loss
forms, the temperature (T = 2), the weights, the teacher of the auxiliary term (the previous snapshot), the
features (the output of every backbone stage) and the pruning criterion (per-array magnitude, no retraining of the
pruned copy) are PROPOSALs consistent with the abstract, all exposed in `configs/m2kd.py`.

'm2kd' is exemplar-free (the paper's main setting); 'm2kd_exemplars' adds the iCaRL herding memory (and NME).
"""
from __future__ import annotations

import jax
import numpy as np

import jax.numpy as jnp

from incremental_jax import parallel, pruning
from incremental_jax.step import make_train_step
from incremental_jax.losses import cross_entropy, kd_kl, masked_mean
from incremental_jax.losses.m2kd import multi_model_kd
from incremental_jax.errors import ConfigError
from incremental_jax.methods.base import Method, TaskContext, snapshot
from incremental_jax.types import TrainState

SIZES_FILE = 'm2kd_snapshots.json'   # the store's file (<workdir>/m2kd_snapshots.json): `sizes_report`


def store_snapshot(model_vars: dict, keep: float) -> dict:
  """The stored (pruned) form of `model_vars` {'params', 'batch_stats'}: {'params': `pruning.compress_tree` at keep
  ratio `keep`, 'batch_stats': dense copies}."""
  model_vars = jax.device_get(model_vars)
  return {'params': pruning.compress_tree(model_vars['params'], keep),
          'batch_stats': jax.tree.map(np.array, model_vars['batch_stats'])}


def weight_masks(params: dict, keep: float) -> dict:
  """0/1 float multipliers of `params`' structure: `pruning.magnitude_mask` on the prunable leaves, 1 elsewhere."""
  def one(path, w):
    w = np.asarray(w)
    return pruning.magnitude_mask(w, keep).astype(w.dtype) if pruning.default_prunable(path, w) else np.ones((), w.dtype)
  return jax.tree_util.tree_map_with_path(one, jax.device_get(params))


class PrunedSnapshotTraining(Method):
  """Retrains a pruned copy of a snapshot with its mask fixed, to reconstruct the dense snapshot's predictions
  (PROPOSAL, the retraining step of mask-based pruning): loss = T^2 KL(softmax(dense / T) || softmax(pruned / T))
  over the seen classes, T = `method.kd_temperature`; after every update the pruned weights are set back to 0.
  `frozen` = {'dense': the dense snapshot, 'mask': `weight_masks`}. No auxiliary loss terms. It trains the
  run's own network `model`."""
  uses_aux_losses = False

  def __init__(self, config, model):
    self._model = model
    super().__init__(config, model.num_classes, ())

  def build_networks(self, num_classes, image_shape):
    return {'model': self._model}

  def teacher_forward(self, model, frozen, images):
    return model.apply(frozen['dense']['params'], frozen['dense']['batch_stats'], images, train=False)[0]

  def loss(self, outputs, batch, task, teacher, params):
    t = float(self.mcfg.kd_temperature)
    kd = t * t * masked_mean(kd_kl(outputs['logits'], teacher['logits'], t, task.seen), batch.get('weight'))
    return kd, {'reconstruction_kd': kd}

  def make_train_step(self, model, phase, augment_fn, has_teacher):
    step = make_train_step(model, self, phase, augment_fn, has_teacher)

    def masked_step(state, frozen, task, batch):
      state, metrics = step(state, frozen, task, batch)
      return state.replace(params=jax.tree.map(jnp.multiply, state.params, frozen['mask'])), metrics

    return masked_step


def append_snapshot(frozen, stored: dict, group: np.ndarray, keep_all: bool, slots: int) -> dict:
  """The frozen pytree {'snapshots': stored snapshots stacked on a leading axis of fixed length `slots`,
  'groups': float [slots, C] the classes each snapshot distils, 'valid': float [slots], 1 for the snapshots
  stored so far (the first ones)} with `stored` (supervising the classes of `group` [C]) put in the first free
  slot; with `keep_all` False it replaces the single snapshot (`slots` = 1). The shapes never change during a
  run, so the train step that reads them compiles once."""
  stored = jax.tree.map(np.asarray, stored)
  group = np.asarray(group, np.float32)
  if not keep_all or frozen is None:
    frozen = {'snapshots': jax.tree.map(lambda x: np.zeros((slots,) + x.shape, x.dtype), stored),
              'groups': np.zeros((slots, len(group)), np.float32), 'valid': np.zeros((slots,), np.float32)}
  frozen = jax.tree.map(np.array, jax.device_get(frozen))   # writable host copies
  k = int(frozen['valid'].sum())
  if k >= slots:
    raise ValueError(f'all {slots} snapshot slots are taken; cannot store another snapshot.')
  for dst, src in zip(jax.tree.leaves(frozen['snapshots']), jax.tree.leaves(stored)):
    dst[k] = src
  frozen['groups'][k], frozen['valid'][k] = group, 1.0
  return frozen


def stacked_forward(model, snapshots: dict, images: jax.Array, valid: jax.Array) -> dict:
  """Inference-mode outputs {'logits': [S, B, C], 'stages': ([S, B, H, W, C], ...)} of the S stacked stored
  snapshots on `images`, each snapshot's masked weights rebuilt from its stored form: one forward per valid
  snapshot (`valid` [S]; `lax.map` over the slots; an empty slot's outputs are 0 and cost nothing)."""
  params_template, _ = jax.eval_shape(model.init_variables)

  def forward(stored):
    params = pruning.decompress_tree(stored['params'], params_template)
    out = model.apply(params, stored['batch_stats'], images, train=False)[0]
    return {'logits': out['logits'], 'stages': tuple(out['stages'])}

  first = jax.tree.map(lambda x: x[0], snapshots)
  empty = lambda stored: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(forward, first))
  return jax.lax.map(lambda sv: jax.lax.cond(sv[1] > 0, forward, empty, sv[0]), (snapshots, valid))


class M2KD(Method):
  """M2KD, exemplar-free. Config (`method.*`): `teachers` ('all' snapshots, M2KD; 'last' = sequential KD from the
  previous model on every old class), `kd_temperature`, `mm_weight`, `mm_domain` ('group' | 'seen', see
  `losses.m2kd.snapshot_class_masks`), `mm_reduction` ('sum' | 'mean' over snapshots), `ce_classes` ('new': the
  current task's classes, as LwF; 'seen': every seen class, needed with exemplars), `prune_keep` (fraction of each
  weight array a stored snapshot keeps; 1 = no pruning), and `aux_losses.feature_kd` {weight, stages}."""
  teacher = 'all'
  state_format = 2   # 2: the snapshots as a fixed stack of slots with a `valid` mask (1: a growing stack)

  @classmethod
  def unversioned_state_format(cls, extra_structure) -> int:
    """Checkpoints from before formats were recorded: 2 when their snapshot stack has its `valid` mask."""
    frozen = extra_structure.get('frozen') or {}
    return 2 if 'valid' in (frozen.get('tree') or {}) else 1

  def __init__(self, config, num_classes, image_shape):
    super().__init__(config, num_classes, image_shape)
    self.pruned_snapshot_training = PrunedSnapshotTraining(config, self.model)

  def check_config(self) -> None:
    m = self.mcfg
    if m.teachers not in ('all', 'last'):
      raise ConfigError(f"method.teachers must be 'all' or 'last'; got {m.teachers!r}.")
    if self.uses_memory and m.ce_classes != 'seen':
      raise ConfigError("with exemplars, method.ce_classes must be 'seen' (exemplars of old classes are trained on).")
    keep = float(m.prune_keep)
    if not 0.0 < keep <= 1.0:
      raise ConfigError(f'method.prune_keep must be in (0, 1]; got {m.prune_keep}.')

  # ---- traced -------------------------------------------------------------------------------------
  def teacher_forward(self, model, frozen, images):
    """All snapshots at once; 'logits' and 'stages' are the last (previous) snapshot's, so single-teacher terms
    (e.g. the auxiliary 'feature_kd') see the previous model."""
    valid = frozen['valid']
    out = stacked_forward(model, frozen['snapshots'], images, valid)
    last = (jnp.sum(valid) - 1).astype(jnp.int32)
    return {'snapshot_logits': out['logits'], 'groups': frozen['groups'], 'valid': valid,
            'logits': out['logits'][last], 'stages': tuple(s[last] for s in out['stages'])}

  def loss(self, outputs, batch, task, teacher, params):
    logits, weights = outputs['logits'], batch.get('weight')
    ce_mask = task.new if self.mcfg.ce_classes == 'new' else task.seen
    ce = masked_mean(cross_entropy(logits, batch['label'], ce_mask), weights)
    if teacher is None:
      return ce, {'ce': ce}
    mm = masked_mean(multi_model_kd(logits, teacher['snapshot_logits'], teacher['groups'],
                                    float(self.mcfg.kd_temperature), self.mcfg.mm_domain, self.mcfg.mm_reduction,
                                    teacher['valid']), weights)
    return ce + float(self.mcfg.mm_weight) * mm, {'ce': ce, 'mm_kd': mm}

  # ---- host-side hooks ----------------------------------------------------------------------------
  def after_task(self, ctx: TaskContext) -> TaskContext:
    """Stores the pruned snapshot of task t: with `teachers='all'` it is appended to the stack and distils the
    classes of task t; with 'last' it replaces the stack and distils every class seen so far."""
    keep_all = self.mcfg.teachers == 'all'
    masks = ctx.scenario.class_masks(ctx.task)
    keep = float(self.mcfg.prune_keep)
    stored = store_snapshot(self._pruned_snapshot(ctx, keep), keep)
    slots = ctx.scenario.num_tasks if keep_all else 1
    frozen = append_snapshot(ctx.frozen, stored, masks['new'] if keep_all else masks['seen'], keep_all, slots)
    dense = pruning.nbytes(jax.device_get({'params': ctx.state.params, 'batch_stats': ctx.state.batch_stats}))
    sizes = np.array([[pruning.nbytes(stored), dense]], np.int32)
    previous = ctx.method_state.get('snapshot_bytes')
    if keep_all and previous is not None:
      sizes = np.concatenate([np.asarray(previous, np.int32), sizes])
    if ctx.store is not None:
      ctx.store.write_json(SIZES_FILE, sizes_report(sizes))
    frozen = jax.device_put(frozen) if ctx.mesh is None else parallel.replicate(frozen, ctx.mesh)
    return ctx.replace(frozen=frozen, method_state={**ctx.method_state, 'snapshot_bytes': sizes})

  def _pruned_snapshot(self, ctx: TaskContext, keep: float) -> dict:
    """The model of task t to store: the dense snapshot, or (with `prune_finetune_epochs` > 0 and keep < 1) its
    pruned copy retrained by `PrunedSnapshotTraining` on the task's training data at `prune_finetune_lr`."""
    dense = snapshot(ctx.state)
    epochs = int(self.mcfg.prune_finetune_epochs or 0)
    if epochs <= 0 or keep >= 1.0:
      return dense
    mask = weight_masks(dense['params'], keep)
    frozen = {'dense': dense, 'mask': mask}
    frozen = jax.device_put(frozen) if ctx.mesh is None else parallel.replicate(frozen, ctx.mesh)
    params = jax.tree.map(jnp.multiply, dense['params'], frozen['mask'])
    state = TrainState(step=jnp.zeros((), jnp.int32), phase_step=jnp.zeros((), jnp.int32), params=params,
                       batch_stats=jax.tree.map(jnp.copy, dense['batch_stats']), opt_state=None)
    if ctx.mesh is not None:
      state = parallel.replicate(state, ctx.mesh)
    optim = ctx.config.optim.copy_and_resolve_references()
    with optim.unlocked():
      optim.update(epochs=epochs, lr=float(self.mcfg.prune_finetune_lr), milestones=(), schedule='cosine')
    method = self.pruned_snapshot_training
    trained = ctx.train_subnetwork(method, method.model, 'pruned_snapshot', optim, self.train_indices(ctx),
                                   frozen=frozen, state=state, seed_offset=1000, seed=int(ctx.config.seed) + 1)
    return {'params': trained.params, 'batch_stats': trained.batch_stats}


class M2KDExemplars(M2KD):
  """M2KD with the iCaRL herding memory (`memory.*`): CE over every seen class on new data + exemplars, the
  multi-model distillation on all of them, NME evaluation."""
  uses_memory = True


def sizes_report(sizes: np.ndarray) -> dict:
  """The content of `m2kd_snapshots.json`: per stored snapshot (rows of `sizes`, [stored, dense] bytes), the bytes
  kept and the dense size, and their totals."""
  rows = [{'snapshot': i, 'stored_bytes': int(s), 'dense_bytes': int(d), 'fraction': round(float(s) / float(d), 4)}
          for i, (s, d) in enumerate(sizes)]
  return {'snapshots': rows, 'stored_bytes': int(sizes[:, 0].sum()), 'dense_bytes': int(sizes[:, 1].sum())}
