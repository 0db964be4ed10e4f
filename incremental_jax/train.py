"""Training: the pure train step and the loop that runs one phase of a task over its epochs.

`train_step(state, frozen, task, batch) -> (state, metrics)` is one `jax.jit` per distinct phase, with the
state donated, the batch sharded over the mesh's 'data' axis and everything else replicated. The learning
rate is computed inside the step from the phase's `TaskInfo` (base lr, epochs, steps per epoch), so tasks of
different sizes reuse the same compiled step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from incremental_jax import faults, parallel
from incremental_jax.data import pipeline
from incremental_jax.models import Model
from incremental_jax.types import Phase, TaskInfo, TrainState


def make_optimizer(optim_cfg) -> optax.GradientTransformation:
  """PyTorch `torch.optim.SGD` without its learning rate: weight decay added to the gradient (coupled L2),
  then heavy-ball (or Nesterov) momentum; with `optim.clip_value` > 0 each gradient element is first clamped to
  [-clip_value, clip_value] (PODNet's gradient hook). The step multiplies the result by the scheduled learning rate."""
  sgd = [optax.add_decayed_weights(float(optim_cfg.weight_decay)),
         optax.trace(decay=float(optim_cfg.momentum), nesterov=bool(optim_cfg.get('nesterov', False)))]
  clip = float(optim_cfg.get('clip_value', 0.0) or 0.0)
  return optax.chain(optax.clip(clip), *sgd) if clip > 0 else optax.chain(*sgd)


def learning_rate(optim_cfg, task: TaskInfo, phase_step: jax.Array) -> jax.Array:
  """The learning rate at `phase_step`: task.lr times the schedule factor at the current epoch.

  Schedules (`optim.schedule`): 'multistep' (times `gamma` at each epoch of `milestones`), 'cosine' (half
  cosine from 1 to 0 over `task.epochs`), 'constant'; plus linear warm-up over `warmup_epochs`. With
  `schedule_unit='epoch'` (default) the factor changes once per epoch like PyTorch's epoch-stepped schedulers;
  'step' makes it continuous.
  """
  epoch = phase_step.astype(jnp.float32) / task.steps_per_epoch
  if optim_cfg.get('schedule_unit', 'epoch') == 'epoch':
    epoch = jnp.floor(epoch)
  kind = optim_cfg.get('schedule', 'constant')
  if kind == 'multistep':
    passed = sum((epoch >= float(m)).astype(jnp.float32) for m in optim_cfg.milestones) if optim_cfg.milestones else 0.0
    factor = jnp.power(float(optim_cfg.get('gamma', 0.1)), passed)
  elif kind == 'cosine':
    factor = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(epoch / task.epochs, 1.0)))
  elif kind == 'constant':
    factor = jnp.ones(())
  else:
    raise ValueError(f"optim.schedule must be 'multistep', 'cosine' or 'constant'; got {kind!r}.")
  warmup = float(optim_cfg.get('warmup_epochs', 0) or 0)
  if warmup > 0:
    continuous = phase_step.astype(jnp.float32) / task.steps_per_epoch
    factor = factor * jnp.minimum(1.0, (continuous + 1.0 / task.steps_per_epoch) / warmup)
  return task.lr * factor


def make_train_step(model: Model, method, phase: Phase, augment_fn: Callable, has_teacher: bool,
                    model_input: Optional[Callable] = None) -> Callable:
  """The pure train step of `phase`: augment on device, run the frozen teacher, differentiate the phase's
  loss, apply SGD with the scheduled learning rate, and mask updates (frozen classes, head-only phases).

  `model_input(images, teacher_outputs)`, when given, is what the trained model is applied to instead of the
  augmented images (e.g. the frozen teacher's feature map, for an autoencoder trained on it)."""
  tx = make_optimizer(phase.optim)

  def train_step(state: TrainState, frozen: Any, task: TaskInfo, batch: dict):
    key = jax.random.fold_in(jax.random.key(task.seed), state.step)
    x = augment_fn(key, batch['image'])
    teacher_out = None
    if has_teacher and phase.use_teacher:
      teacher_out = jax.lax.stop_gradient(method.teacher_forward(model, frozen, x))

    inputs = x if model_input is None else model_input(x, teacher_out)

    def loss_of(params):
      outputs, new_stats = model.apply(params, state.batch_stats, inputs, train=phase.train_backbone)
      loss, metrics = phase.loss(outputs, batch, task, teacher_out, params)
      return loss, (metrics, new_stats)

    (loss, (metrics, new_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    lr = learning_rate(phase.optim, task, state.phase_step)
    mask = head_update_mask(model, state.params, task.trainable, backbone=phase.train_backbone,
                            frozen=tuple(phase.frozen_params))
    params = jax.tree.map(lambda p, u, m: p - lr * m * u, state.params, updates, mask)
    metrics = {**metrics, 'loss': loss, 'lr': lr}
    return state.replace(step=state.step + 1, phase_step=state.phase_step + 1, params=params,
                         batch_stats=new_stats, opt_state=opt_state), metrics

  return train_step


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


@dataclasses.dataclass
class PhaseResult:
  state: TrainState
  epoch_metrics: list  # per epoch: {metric: mean over the epoch's steps}


class Trainer:
  """Compiles and runs phases: one compiled step per distinct phase (name, teacher present, static optimiser
  fields); `compile_count` says how many were built in this process."""

  def __init__(self, model: Model, method, mesh, augment_fn: Callable, seed: int, show_progress: bool = True):
    self.model, self.method, self.mesh = model, method, mesh
    self.augment_fn, self.seed, self.show_progress = augment_fn, seed, show_progress
    self._steps: dict = {}
    self._opt_init: dict = {}
    self.compile_count = 0

  @staticmethod
  def _step_key(phase: Phase, has_teacher: bool) -> tuple:
    # lr and epochs are traced (TaskInfo); every other optimiser field is baked into the compiled step.
    static_optim = tuple(sorted((k, str(v)) for k, v in phase.optim.items() if k not in ('lr', 'epochs')))
    return (phase.name, has_teacher, phase.train_backbone, phase.use_teacher, tuple(phase.frozen_params), static_optim)

  def _compiled_step(self, phase: Phase, has_teacher: bool):
    key = self._step_key(phase, has_teacher)
    if key not in self._steps:
      step = self.method.make_train_step(self.model, phase, self.augment_fn, has_teacher)
      repl = parallel.replicated(self.mesh)
      self._steps[key] = jax.jit(step, donate_argnums=(0,), out_shardings=(repl, repl))
      self.compile_count += 1
    return self._steps[key]

  def _epoch_plan(self, phase: Phase, labels: np.ndarray, rng_seed: tuple) -> list:
    """The sampler's index rows [steps, batch] of every epoch of `phase`; epoch e draws from
    `np.random.default_rng(rng_seed + (e,))`."""
    batch_size = int(phase.optim.batch_size)
    parallel.check_batch_divisible(batch_size)
    sampler = pipeline.get_sampler(phase.sampler or self.method.config.data.get('sampler', 'shuffle'))
    sampler_kw = dict(self.method.config.data.get('sampler_kwargs', {}) or {})
    return [sampler(phase.indices, labels[phase.indices], batch_size, np.random.default_rng(rng_seed + (e,)),
                    **sampler_kw) for e in range(int(phase.optim.epochs))]

  @staticmethod
  def _phase_task(task: TaskInfo, phase: Phase, steps_per_epoch: int, seed: int) -> TaskInfo:
    return task.replace(lr=jnp.float32(phase.optim.lr), epochs=jnp.float32(int(phase.optim.epochs)),
                        steps_per_epoch=jnp.float32(steps_per_epoch), seed=jnp.int32(seed))

  def _phase_start(self, state: TrainState, phase: Phase) -> TrainState:
    """A phase starts with `phase_step` 0 and a fresh optimiser state."""
    return state.replace(phase_step=parallel.replicate(np.zeros((), np.int32), self.mesh),
                         opt_state=self.init_opt_state(phase, state.params))

  def _compiled_group_step(self, phase: Phase, has_teacher: bool):
    """The vmapped step over a leading run axis: `(states, frozens, tasks, batches, valid [R]) -> (states,
    metrics)`; runs whose `valid` is 0 keep their state (their batch is padding)."""
    key = ('group', self._step_key(phase, has_teacher))
    if key not in self._steps:
      step = jax.vmap(self.method.make_train_step(self.model, phase, self.augment_fn, has_teacher))

      def group_step(state, frozen, task, batch, valid):
        new_state, metrics = step(state, frozen, task, batch)
        keep = lambda new, old: jnp.where(valid.reshape((-1,) + (1,) * (new.ndim - 1)) > 0, new, old)
        return jax.tree.map(keep, new_state, state), metrics

      repl = parallel.replicated(self.mesh)
      self._steps[key] = jax.jit(group_step, donate_argnums=(0,), out_shardings=(repl, repl))
      self.compile_count += 1
    return self._steps[key]

  def init_opt_state(self, phase: Phase, params):
    if phase.name not in self._opt_init:
      self._opt_init[phase.name] = jax.jit(make_optimizer(phase.optim).init,
                                           out_shardings=parallel.replicated(self.mesh))
    return self._opt_init[phase.name](params)

  def run_phase(self, state: TrainState, frozen: Any, task: TaskInfo, phase: Phase, images, labels: np.ndarray,
                rng_seed: tuple, desc: str = '', on_epoch_end: Optional[Callable] = None, start_epoch: int = 0,
                history: Optional[list] = None) -> PhaseResult:
    """Trains `phase` for `phase.optim.epochs` epochs over `phase.indices`. The sampler of epoch e draws from
    `np.random.default_rng(rng_seed + (e,))`, so a run is reproducible and resumable.

    `on_epoch_end(e, state)` is called after each epoch (e.g. to write a mid-task checkpoint). To continue an
    interrupted phase, pass the state saved after epoch `start_epoch - 1` (its optimiser state and `phase_step`
    are kept) and `start_epoch`; epochs before it are skipped. `history`, when given, is extended in place with
    each epoch's mean metrics and returned as `epoch_metrics`.

    Raises FloatingPointError, naming the global step, when a step's loss is not finite; the check reads the
    epoch's metrics once at the epoch end, so it adds nothing to the compiled step.
    """
    epochs = int(phase.optim.epochs)
    plan = self._epoch_plan(phase, labels, rng_seed)
    steps_per_epoch = len(plan[0]) if plan else 1
    task = parallel.replicate(self._phase_task(task, phase, steps_per_epoch, self.seed), self.mesh)
    has_teacher = frozen is not None
    step_fn = self._compiled_step(phase, has_teacher)
    if start_epoch == 0:
      state = self._phase_start(state, phase)
    history = [] if history is None else history
    bar = _progress(epochs * steps_per_epoch, desc, self.show_progress)
    bar.update(start_epoch * steps_per_epoch)
    fault_per_step = faults.armed('train_step')
    for e in range(start_epoch, epochs):
      epoch_metrics = []
      for batch in pipeline.device_batches(images, labels, plan[e], self.mesh):
        state, metrics = step_fn(state, frozen, task, batch)
        epoch_metrics.append(metrics)
        bar.update(1)
        if fault_per_step:
          faults.reached('train_step')
      stacked = _stack(epoch_metrics)
      means = {k: float(v) for k, v in jax.device_get(jax.tree.map(jnp.mean, stacked)).items()}
      history.append(means)
      bar.set_postfix(epoch=e + 1, loss=f"{means['loss']:.4f}", refresh=False)
      if not np.isfinite(means['loss']):
        bar.close()
        raise FloatingPointError(_non_finite_message(desc, np.asarray(jax.device_get(stacked['loss'])),
                                                     int(jax.device_get(state.step)), e))
      faults.reached('epoch_end')
      if on_epoch_end is not None:
        on_epoch_end(e, state)
    bar.close()
    return PhaseResult(state=state, epoch_metrics=history)


def run_phase_group(trainer: Trainer, states: list, frozens: list, tasks: list, phases: list, images,
                    labels: list, rng_seeds: list, seeds: list, desc: str = '') -> list:
  """Trains the same phase of R independent runs together: their states, teachers, task constants (with
  their own seeds) and batches are stacked on a leading run axis and one `jax.vmap`-ed step (compiled once
  per phase) updates all R. Run k draws its batches exactly as `run_phase` would alone (its own labels, class
  order and sampler seed `rng_seeds[k]`); when runs have different numbers of steps per epoch, the shorter
  ones repeat their last batch with the update discarded, so every run takes exactly its own steps.

  Returns one `PhaseResult` per run (its state and per-epoch mean metrics over its own steps). Raises
  FloatingPointError naming the run whose loss is not finite.
  """
  mesh, phase = trainer.mesh, phases[0]
  epochs = int(phase.optim.epochs)
  plans = [trainer._epoch_plan(p, lab, rs) for p, lab, rs in zip(phases, labels, rng_seeds)]
  run_steps = np.array([len(plan[0]) for plan in plans])
  tasks = [trainer._phase_task(t, phase, n, seed) for t, n, seed in zip(tasks, run_steps, seeds)]
  state = _stack([trainer._phase_start(s, phase) for s in states])
  frozen = None if frozens[0] is None else _stack(frozens)
  task = parallel.replicate(_stack(tasks), mesh)
  step_fn = trainer._compiled_group_step(phase, frozen is not None)
  steps = int(run_steps.max())
  bar = _progress(epochs * steps, desc, trainer.show_progress)
  histories = [[] for _ in states]
  for e in range(epochs):
    rows = [[plan[e][min(i, len(plan[e]) - 1)] for plan in plans] for i in range(steps)]
    valid = (np.arange(steps)[:, None] < run_steps[None]).astype(np.float32)          # [steps, R]
    epoch_metrics = []
    for i, batch in enumerate(pipeline.device_run_batches(images, labels, rows, mesh)):
      state, metrics = step_fn(state, frozen, task, batch, parallel.replicate(valid[i], mesh))
      epoch_metrics.append(metrics)
      bar.update(1)
    stacked = jax.device_get(_stack(epoch_metrics))   # [steps, R] each
    for k, history in enumerate(histories):
      history.append({name: float((v[:, k] * valid[:, k]).sum() / valid[:, k].sum()) for name, v in stacked.items()})
      if not np.isfinite(history[-1]['loss']):
        bar.close()
        raise FloatingPointError(f'run {k}: ' + _non_finite_message(
            desc, np.asarray(stacked['loss'][:run_steps[k], k]), int(jax.device_get(state.step[k])), e))
    bar.set_postfix(epoch=e + 1, loss=' '.join(f"{h[-1]['loss']:.3f}" for h in histories), refresh=False)
  bar.close()
  return [PhaseResult(state=jax.tree.map(lambda x: x[k], state), epoch_metrics=histories[k])
          for k in range(len(states))]


def _stack(trees: list):
  """Pytrees of equal structure -> one pytree whose leaves are stacked on a new leading axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _non_finite_message(desc: str, step_losses: np.ndarray, end_step: int, epoch: int) -> str:
  """Names the first step of an epoch whose loss is not finite, by its global step (0-based: the number of
  steps taken before it in the run)."""
  i = int(np.flatnonzero(~np.isfinite(step_losses))[0])
  step = end_step - len(step_losses) + i
  return (f'{desc}: the loss became {step_losses[i]} at global step {step} (step {i + 1} of epoch {epoch + 1}); '
          'stopping. The last complete checkpoint is kept; lower optim.lr or check the data.')


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


def _progress(total: int, desc: str, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, unit='step', leave=True, disable=not enabled or jax.process_index() != 0,
              dynamic_ncols=True)


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
