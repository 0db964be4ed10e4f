"""The pure train step: `train_step(state, frozen, task, batch) -> (state, metrics)`, the optimiser it applies
and the update masks, plus the small constructors every trainer needs (initial state, task constants).

Nothing here loops or knows a method by name: a method passes its losses and `teacher_forward`, and methods
with a step of their own (IE-DML) build it from `augmented_batch`, `learning_rate` and `advanced`. The learning
rate is computed inside the step from the phase's `TaskInfo` (base lr, epochs, steps per epoch), so tasks of
different sizes reuse the same compiled step.

The optimiser is composed from optax as far as that keeps the numbers and one compile per phase: the update
direction is an `optax.chain` (`clip`, `add_decayed_weights`, `trace`: `make_optimizer`), the learning rate is
the schedule evaluated at the traced epoch (`learning_rate`, `SCHEDULES`), the masked, scaled increments
(`masked_descent`) are added by `optax.apply_updates`. Three optax pieces are not used, on purpose:
- `optax.sgd` / `scale_by_learning_rate` with a schedule: an optax schedule is a function of the optimiser's
  step count alone, while the rate here also depends on `TaskInfo.lr`, `.epochs` and `.steps_per_epoch`, which
  are traced step arguments (a Python-side schedule would recompile the step for every task size).
- `optax.inject_hyperparams`: it could hold that rate, but only by overwriting it in the optimiser state every
  step, and it adds a count and a hyperparameter dict to `opt_state`; the state's structure is what checkpoints
  are restored against (`train.init_opt_state`, IE-KD's `_abstract_state`), so checkpoints written before would
  no longer restore, for no change in a number.
- `optax.masked`: it takes one static boolean per leaf and passes the leaves outside the mask through
  unchanged; the update mask here zeroes class rows of the head leaves by `TaskInfo.trainable`, a traced array
  that changes from task to task. So the mask multiplies the increments, as the code before the composition
  did: p + (-(lr * m) * u) equals p - lr * m * u bit for bit (negation is exact), and the digits presets'
  results.json are unchanged (`benchmarks/compare_checkouts.py`).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from incremental_jax import parallel
from incremental_jax.models import Model
from incremental_jax.registry import Registry
from incremental_jax.types import Phase, TaskInfo, TrainState


def make_optimizer(optim_cfg) -> optax.GradientTransformation:
  """PyTorch `torch.optim.SGD` without its learning rate: weight decay added to the gradient (coupled L2),
  then heavy-ball (or Nesterov) momentum; with `optim.clip_value` > 0 each gradient element is first clamped to
  [-clip_value, clip_value] (PODNet's gradient hook). The step multiplies the result by the scheduled learning rate."""
  sgd = [optax.add_decayed_weights(float(optim_cfg.weight_decay)),
         optax.trace(decay=float(optim_cfg.momentum), nesterov=bool(optim_cfg.nesterov))]
  clip = float(optim_cfg.clip_value or 0.0)
  return optax.chain(optax.clip(clip), *sgd) if clip > 0 else optax.chain(*sgd)


def multistep_factor(optim_cfg, epoch: jax.Array, task: TaskInfo) -> jax.Array:
  """`gamma` to the number of `milestones` reached at `epoch` (PyTorch's MultiStepLR)."""
  del task
  passed = sum((epoch >= float(m)).astype(jnp.float32) for m in optim_cfg.milestones) if optim_cfg.milestones else 0.0
  return jnp.power(float(optim_cfg.gamma), passed)


def cosine_factor(optim_cfg, epoch: jax.Array, task: TaskInfo) -> jax.Array:
  """A half cosine from 1 at epoch 0 to 0 at `task.epochs` (PyTorch's CosineAnnealingLR with eta_min 0)."""
  del optim_cfg
  return 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(epoch / task.epochs, 1.0)))


def constant_factor(optim_cfg, epoch: jax.Array, task: TaskInfo) -> jax.Array:
  """1 at every epoch."""
  del optim_cfg, epoch, task
  return jnp.ones(())


# optim.schedule -> factor(optim_cfg, epoch, task) of the base learning rate, traced (epoch and task are arrays).
SCHEDULES: Registry[Callable[..., jax.Array]] = Registry('a learning-rate schedule', {
    'multistep': multistep_factor,
    'cosine': cosine_factor,
    'constant': constant_factor,
})


def learning_rate(optim_cfg, task: TaskInfo, phase_step: jax.Array) -> jax.Array:
  """The learning rate at `phase_step`: task.lr times the schedule factor at the current epoch.

  Schedules (`optim.schedule`, `SCHEDULES`): 'multistep' (times `gamma` at each epoch of `milestones`), 'cosine'
  (half cosine from 1 to 0 over `task.epochs`), 'constant'; plus linear warm-up over `warmup_epochs`. With
  `schedule_unit='epoch'` (default) the factor changes once per epoch like PyTorch's epoch-stepped schedulers;
  'step' makes it continuous.

  `optim.schedule_offset` (k in {-1, 0, 1}) is where in its loop the official code steps the scheduler: epoch e
  trains with the schedule's value at max(0, e + k) (in step units the continuous epoch is shifted alike).
  0: `scheduler.step()` after each epoch (PyCIL) or the schedule set at the start of epoch e from e (pycls, the
  IE-KD release), and PyTorch < 1.1's `step()` at the start of each epoch (LUCIR); -1: `scheduler.step(epoch)`
  after each epoch (PODNet's `inclearn/models/icarl.py::_training_step`: epochs 0 and 1 both train at the base
  lr) or the lr set after each epoch from that epoch (BAKE's `small_scale/train.py::adjust_learning_rate`);
  +1: `step()` at the start of each epoch under PyTorch >= 1.1. The warm-up is not shifted: its factor
  min(1, (phase_step + 1) / (warmup_epochs * steps_per_epoch)) multiplies the shifted schedule's.
  """
  continuous = phase_step.astype(jnp.float32) / task.steps_per_epoch
  epoch = jnp.floor(continuous) if optim_cfg.schedule_unit == 'epoch' else continuous
  epoch = jnp.maximum(epoch + float(optim_cfg.schedule_offset), 0.0)
  factor = SCHEDULES.lookup(optim_cfg.schedule, 'optim.schedule')(optim_cfg, epoch, task)
  warmup = float(optim_cfg.warmup_epochs or 0)
  if warmup > 0:
    factor = factor * jnp.minimum(1.0, (continuous + 1.0 / task.steps_per_epoch) / warmup)
  return task.lr * factor


def augmented_batch(augment_fn: Callable, task: TaskInfo, state: TrainState, images: jax.Array) -> jax.Array:
  """The on-device augmentation of global step `state.step`: keyed by `fold_in(key(task.seed), step)`, so nothing
  random is saved for resume and runs trained together differ only through their seeds."""
  return augment_fn(jax.random.fold_in(jax.random.key(task.seed), state.step), images)


def advanced(state: TrainState, params, batch_stats, opt_state) -> TrainState:
  """`state` after one update: the new variables and optimiser state, both step counters incremented."""
  return state.replace(step=state.step + 1, phase_step=state.phase_step + 1, params=params,
                       batch_stats=batch_stats, opt_state=opt_state)


def make_train_step(model: Model, method, phase: Phase, augment_fn: Callable, has_teacher: bool,
                    model_input: Optional[Callable] = None) -> Callable:
  """The pure train step of `phase`: augment on device, run the frozen teacher, differentiate the phase's
  loss, apply SGD with the scheduled learning rate, and mask updates (frozen classes, head-only phases).

  `model_input(images, teacher_outputs)`, when given, is what the trained model is applied to instead of the
  augmented images (e.g. the frozen teacher's feature map, for an autoencoder trained on it).

  A batch padded to its compiled size (the last partial batch of an epoch, `data.drop_last=False`) carries
  `batch['weight']` [B] (1 real, 0 padding): BatchNorm's statistics come from the real examples
  (`example_mask`), and the phase's loss reduces over them (`losses.masked_mean`); the frozen teacher runs in
  inference mode and needs no mask."""
  tx = make_optimizer(phase.optim)

  def train_step(state: TrainState, frozen: Any, task: TaskInfo, batch: dict):
    x = augmented_batch(augment_fn, task, state, batch['image'])
    teacher_out = None
    if has_teacher and phase.use_teacher:
      teacher_out = jax.lax.stop_gradient(method.teacher_forward(model, frozen, x))

    inputs = x if model_input is None else model_input(x, teacher_out)
    mask = example_mask(batch)

    def loss_of(params):
      outputs, new_stats = model.apply(params, state.batch_stats, inputs, train=phase.train_backbone, mask=mask)
      loss, metrics = phase.loss(outputs, batch, task, teacher_out, params)
      return loss, (metrics, new_stats)

    (loss, (metrics, new_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    lr = learning_rate(phase.optim, task, state.phase_step)
    mask = head_update_mask(model, state.params, task.trainable, backbone=phase.train_backbone,
                            frozen=tuple(phase.frozen_params))
    params = optax.apply_updates(state.params, masked_descent(updates, lr, mask))
    metrics = {**metrics, 'loss': loss, 'lr': lr}
    return advanced(state, params, new_stats, opt_state), metrics

  return train_step


def example_mask(batch: dict) -> Optional[jax.Array]:
  """The real examples of a batch, bool [B] (`batch['weight'] > 0`), for BatchNorm in training mode
  (`Model.apply(..., mask=)`); None for a batch without weights (every example real)."""
  weight = batch.get('weight')
  return None if weight is None else weight > 0


def masked_descent(updates, lr: jax.Array, mask) -> Any:
  """The increments of an SGD step: `-(lr * mask) * update` per element, for `optax.apply_updates` (which adds
  them: p + (-(lr * m) * u) is p - lr * m * u to the last bit, as PyTorch's `p.add_(d_p, alpha=-lr)`).
  `mask` is `head_update_mask`'s tree of multipliers (0/1, whole leaves or class rows)."""
  return jax.tree.map(lambda u, m: (-lr * m) * u, updates, mask)


def head_update_mask(model: Model, params: dict, class_mask: jax.Array, backbone: bool = True,
                     frozen: tuple[str, ...] = ()) -> dict:
  """Multipliers (0/1) for parameter updates: class-indexed head parameters are masked to `class_mask`
  [num_classes] along their class axis; the other parameters get 1 (or 0 when `backbone` is False, for
  phases that train the head only). Parameters whose '/'-joined path is in `frozen` or lies under one of its
  entries (e.g. 'head/sigma') get 0."""

  def mask_for(path, leaf):
    keys = [getattr(k, 'key', k) for k in path]
    name = '/'.join(str(k) for k in keys)
    if any(name == f or name.startswith(f + '/') for f in frozen):
      return jnp.zeros((), leaf.dtype)
    if keys[0] == 'head' and keys[-1] in model.head_class_axes:
      axis = model.head_class_axes[keys[-1]] % leaf.ndim
      shape = [1] * leaf.ndim
      shape[axis] = leaf.shape[axis]
      return jnp.reshape(class_mask.astype(leaf.dtype), shape)
    if keys[0] == 'head':
      return jnp.ones((), leaf.dtype)
    return jnp.ones((), leaf.dtype) if backbone else jnp.zeros((), leaf.dtype)

  return jax.tree_util.tree_map_with_path(mask_for, params)


def init_train_state(model: Model, mesh, tx: optax.GradientTransformation) -> TrainState:
  """The initial state: the model's initial variables and a fresh optimiser state (reset by every phase)."""
  params, stats = model.init_variables()
  state = TrainState(step=jnp.zeros((), jnp.int32), phase_step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats=stats, opt_state=tx.init(params))
  return parallel.replicate(state, mesh)


def make_task_info(scenario, t: int, trainable: np.ndarray) -> TaskInfo:
  masks = scenario.class_masks(t)
  return TaskInfo(index=jnp.int32(t), old=jnp.asarray(masks['old']), new=jnp.asarray(masks['new']),
                  seen=jnp.asarray(masks['seen']), trainable=jnp.asarray(trainable, jnp.float32),
                  lr=jnp.float32(0), epochs=jnp.float32(1), steps_per_epoch=jnp.float32(1))


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


_all_finite_jit = jax.jit(_all_finite)


def check_finite(state: TrainState, desc: str = '') -> None:
  """Raises FloatingPointError if any parameter or batch statistic is NaN/inf (e.g. an infinite gradient on
  the last step of a phase, which no loss shows); called before anything is checkpointed, outside the step."""
  if not bool(_all_finite_jit({'params': state.params, 'batch_stats': state.batch_stats})):
    raise FloatingPointError(f'{desc}: parameters are not finite after global step {int(jax.device_get(state.step))}; '
                             'stopping before they are checkpointed. The last complete checkpoint is kept; lower '
                             'optim.lr or check the data.')
