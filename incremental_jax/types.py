"""The training vocabulary: what a train step, a phase and a loss are. A leaf module (it imports nothing of the
package), shared by the training loop, the methods and the run.

    TrainState   the trained network's parameters, batch statistics, optimiser state and step counters;
    TaskInfo     the constants of the current task and phase, as arrays (a new task does not recompile);
    LossFn       loss(outputs, batch, task, teacher_outputs, params) -> (scalar loss, {name: scalar metric});
    Phase        one training phase of a task (its loss, examples, optimiser section and what it trains).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import numpy as np
from flax import struct


@struct.dataclass
class TrainState:
  """step: global step (seeds the augmentation); phase_step: step within the phase (drives the schedule)."""
  step: jax.Array
  phase_step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


@struct.dataclass
class TaskInfo:
  """Constants of the current task and phase, as arrays so that a new task does not recompile the step.

  Attributes:
    index: task index t (int32 scalar).
    old, new, seen: float32 [C] masks over (remapped) classes: earlier tasks, task t, and both.
    trainable: float32 [C] classes whose classifier parameters receive updates in this phase.
    lr, epochs, steps_per_epoch: float32 scalars of the phase's learning-rate schedule.
    seed: the run's seed (int32 scalar): the augmentation of global step s uses
      `fold_in(key(seed), s)`; traced, so that runs trained together (`num_runs`) differ only in data.
  """
  index: jax.Array
  old: jax.Array
  new: jax.Array
  seen: jax.Array
  trainable: jax.Array
  lr: jax.Array
  epochs: jax.Array
  steps_per_epoch: jax.Array
  seed: jax.Array = 0

  @property
  def num_old(self) -> jax.Array:
    return self.old.sum()

  @property
  def num_new(self) -> jax.Array:
    return self.new.sum()

  @property
  def num_seen(self) -> jax.Array:
    return self.seen.sum()


# loss(outputs, batch, task, teacher_outputs, params) -> (scalar loss, {name: scalar metric}); `batch` holds 'image',
# 'label' and, in the train loop, 'weight' [B] (0 for the padding of an epoch's last partial batch): every term
# averaged over the batch reduces over the real examples (`losses.masked_mean`).
LossFn = Callable[[dict, dict, TaskInfo, Optional[dict], dict], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Phase:
  """One training phase of a task.

  Attributes:
    name: identifies the compiled step (phases with one name share one compilation).
    loss: the traced loss function (see LossFn).
    indices: training examples (indices into the train split) of this phase.
    optim: the optimiser config section (lr, epochs, schedule, milestones, gamma, warmup_epochs, momentum,
      nesterov, weight_decay, batch_size).
    train_backbone: False trains the head only, with the backbone in inference mode (BatchNorm statistics
      frozen), e.g. class-balanced finetuning of the classifier.
    use_teacher: whether the step evaluates the frozen teacher (when one exists).
    trainable_classes: float [C] classes whose head parameters are updated; None means the method's default
      (new classes if `freeze_old_classes`, else all seen classes).
    sampler: the epoch sampler name (`incremental_jax.data.pipeline.SAMPLERS`); None uses the data config's.
    frozen_params: '/'-joined parameter paths (or their prefixes), e.g. 'head/sigma', that get no update in
      this phase (LUCIR's class-balanced finetuning leaves the cosine scale out of its optimiser).
  """
  name: str
  loss: LossFn
  indices: np.ndarray
  optim: Any
  train_backbone: bool = True
  use_teacher: bool = True
  trainable_classes: Optional[np.ndarray] = None
  sampler: Optional[str] = None
  frozen_params: tuple[str, ...] = ()
