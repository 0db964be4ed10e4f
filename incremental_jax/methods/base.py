"""The method interface. A method is a composition of pure losses plus host-side task hooks; the task loop
(`incremental_jax.run`, through `incremental_jax.task_stages`) calls the hooks in this order for every task t:

    ctx = method.before_task(ctx)                # e.g. imprint the new classes' weights
    for phase in method.phases(ctx):             # e.g. the main training phase
        train phase                              #   one compiled step per distinct phase
    memory update (herding), if uses_memory
    for phase in method.balancing_phases(ctx):   # e.g. class-balanced finetuning on the memory
        train phase
    ctx = method.after_task(ctx)                 # e.g. freeze a teacher snapshot
    evaluate (CNN, and NME when uses_memory), checkpoint

Traced code (losses, `teacher_forward`) sees only arrays: model outputs, the batch, a `TaskInfo` pytree and
the teacher's outputs. Nothing in the loop branches on a method's name.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from incremental_jax import parallel
from incremental_jax.errors import ConfigError
from incremental_jax.losses.auxiliary import with_aux_losses
from incremental_jax.memory import Memory
from incremental_jax.method_store import MethodStore
from incremental_jax.models import build_model
from incremental_jax.step import make_task_info, make_train_step
from incremental_jax.types import LossFn, Phase, TaskInfo  # noqa: F401  (the vocabulary of every method)


@dataclasses.dataclass(frozen=True)
class TaskContext:
  """What host-side hooks read and may replace (with `dataclasses.replace`) for task `task`.

  Attributes:
    config: the run config.
    task: the task index t.
    scenario: the `Scenario` (class order and task sizes).
    train_images, train_labels: the train split (labels remapped to class-order positions).
    model: the functional `Model`.
    state: the `TrainState` (params, batch_stats, optimiser state, step counters).
    frozen: the frozen pytree the train step passes to `teacher_forward` (None when there is no teacher).
    method_state: str-keyed dict of arrays a method keeps across tasks (checkpointed).
    memory: the exemplar `Memory`.
    embed: `embed(params, batch_stats, indices, flip=False) -> np.ndarray [n, D]`, embeddings of train images
      in inference mode (for herding, imprinting, class means).
    predict: `predict(params, batch_stats, images, flip=False) -> dict of np arrays` (`logits`, `embedding`),
      inference mode.
    mesh: the device mesh.
    augment_fn: `(key, uint8 images) -> float images`, the run's on-device augmentation.
    store: the run's `MethodStore`, for networks and files a method keeps in the workdir (IE-KD's teacher,
      M2KD's snapshot sizes); None outside a run (nothing is kept).
    trainer: the training service (`train.SubnetworkTrainer`) for hooks that train a network of their own
      (`train_subnetwork`).
  """
  config: Any
  task: int
  scenario: Any
  train_images: Any
  train_labels: np.ndarray
  model: Any
  state: Any
  frozen: Any
  method_state: dict
  memory: Memory
  embed: Callable
  predict: Callable
  mesh: Any = None
  augment_fn: Optional[Callable] = None
  store: Optional[MethodStore] = None
  trainer: Any = None

  def replace(self, **changes) -> 'TaskContext':
    return dataclasses.replace(self, **changes)

  def train_subnetwork(self, method: 'Method', model, name: str, optim, indices: np.ndarray, frozen: Any = None,
                       state: Any = None, seed_offset: int = 1000, seed: Optional[int] = None):
    """Trains `model` (from `state`, or its initial variables) with `method`'s step for one phase named `name`
    on the train examples `indices`, every seen class trainable, and returns its final `TrainState`. The
    sampler draws from `(config.seed, task, seed_offset)`; the augmentation is keyed by `seed` (default
    `config.seed`)."""
    task = make_task_info(self.scenario, self.task, self.scenario.class_masks(self.task)['seen'])
    phase = Phase(name, method.loss, indices, optim)
    seed = int(self.config.seed) if seed is None else int(seed)
    return self.trainer.train(method, model, phase, task, self.train_labels, self.train_images, self.augment_fn,
                              rng_seed=(int(self.config.seed), self.task, seed_offset), seed=seed, state=state,
                              frozen=frozen, desc=f'step {self.task} {name}')

  def class_range(self, t: Optional[int] = None) -> tuple[int, int]:
    t = self.task if t is None else t
    return self.scenario.task_start(t), self.scenario.task_end(t)

  def new_class_indices(self) -> np.ndarray:
    """Train examples of the current task's classes."""
    lo, hi = self.class_range()
    return self.scenario.indices_of_classes(self.train_labels, lo, hi)

  def seen_class_indices(self) -> np.ndarray:
    """Train examples of every class seen so far (joint training)."""
    return self.scenario.indices_of_classes(self.train_labels, 0, self.scenario.task_end(self.task))


def snapshot(state) -> dict:
  """A frozen copy of the model: parameters and batch statistics, no optimiser state (real copies, so the
  teacher never aliases the donated training state)."""
  return jax.tree.map(jnp.copy, {'params': state.params, 'batch_stats': state.batch_stats})


class Method:
  """Base class of all methods. Override what differs; the defaults give plain fine-tuning hooks.

  A method is built for one problem, `Method(config, num_classes, image_shape)`: its networks are made once by
  `build_networks` (`self.networks`; `self.model` is the trained one, `networks['model']`).

  Class attributes:
    uses_memory: keep exemplars (config.memory) and evaluate NME.
    teacher: what the train step's `frozen` pytree holds: 'none'; 'last' (the default `after_task` freezes a
      snapshot of the model after every task); 'all' (every earlier snapshot, M2KD); 'pretrained' (a fixed
      teacher network trained beforehand, KD / IE-KD). Methods other than 'last' set `frozen` in their hooks
      and override `teacher_forward`.
    freeze_old_classes: old classes' classifier parameters get no updates (LUCIR, PODNet).
    required_head: the `model.head` the method's losses need (checked at construction).
    uses_aux_losses: whether `config.method.aux_losses` are added to `loss`.
    state_format: the version of the layout of `method_state` (and of `frozen`) in checkpoints; a method that
      changes it raises this number, and the run then refuses its older checkpoints with a one-line message.
    hyperparameters: the `method.*` float fields the traced loss reads through `hp` (loss weights, temperatures,
      margins, the learning rates of the method's own phases): in runs trained together they travel as float32
      values in `TaskInfo.hparams`, so runs that differ only in them train as one vmapped group with one
      compilation (a sweep, `incremental_jax.sweeps`); a run trained alone reads them as constants. A field whose
      value is 0 in one run and not in another still splits the group (a loss may skip a term whose weight is 0).
      A method's own phase learning rates (set as `optim.lr` of its phases) are traced through `TaskInfo.lr`.

  Auxiliary loss terms named in `config.method.aux_losses` (e.g. BAKE, see `losses.auxiliary`) are added to
  `self.loss` when the method is built, so every phase that trains with the method's loss gets them; phases
  with a loss of their own (e.g. class-balanced finetuning) do not.
  """
  uses_memory: bool = False
  teacher: str = 'none'
  required_head: Optional[str] = None
  freeze_old_classes: bool = False
  uses_aux_losses: bool = True
  state_format: int = 1
  hyperparameters: tuple[str, ...] = ()

  def __init__(self, config, num_classes: int, image_shape: tuple[int, int, int]):
    self.config = config
    self.mcfg = config.method
    self.num_classes, self.image_shape = int(num_classes), tuple(image_shape)
    if self.required_head is not None and config.model.head != self.required_head:
      raise ConfigError(f'method {config.method.name} needs model.head={self.required_head!r}; got '
                        f'{config.model.head!r}.')
    self.check_config()
    if self.uses_aux_losses:
      self.loss = with_aux_losses(self.loss, self.mcfg.aux_losses)
    self.networks = self.build_networks(self.num_classes, self.image_shape)
    self.model = self.networks['model']

  @classmethod
  def unversioned_state_format(cls, extra_structure) -> int:
    """The `state_format` of a checkpoint written before formats were recorded, from the structure of its
    `extra` item ({'frozen': {'tree': ...} or {}, 'method_state': ..., 'memory': ...}). Default: 1."""
    del extra_structure
    return 1

  def check_config(self) -> None:
    """Raises ConfigError for invalid `method.*` values. Called at construction, which needs the problem's number
    of classes and image shape: a run builds its method once the data set is loaded, so this runs after the data
    is read and before its workdir is opened or anything trains."""

  def build_networks(self, num_classes: int, image_shape: tuple[int, int, int]) -> dict:
    """{'model': the trained network, ...any other network the method's hooks or `teacher_forward` use}.
    Methods with extra trainable modules (IE-KD's encoders) or a teacher architecture override this."""
    return {'model': build_model(self.config.model, num_classes, image_shape, seed=self.config.seed)}

  def hyperparameter_values(self) -> dict:
    """{name: float32 value} of the method's `hyperparameters` in its config (`TaskInfo.hparams`)."""
    return {name: jnp.float32(self.mcfg[name]) for name in self.hyperparameters}

  # ---- traced -------------------------------------------------------------------------------------
  def hp(self, task: TaskInfo, name: str):
    """The value of hyperparameter `name` (one of `hyperparameters`) in the step: the run's traced value from
    `task.hparams`, or the config's (a constant) where the task carries none (a sub-network's phase)."""
    values = getattr(task, 'hparams', None) or {}   # a task-like object without them (a test's): constants
    return values[name] if name in values else float(self.mcfg[name])

  def loss(self, outputs: dict, batch: dict, task: TaskInfo, teacher: Optional[dict], params: dict):
    raise NotImplementedError

  def teacher_forward(self, model, frozen: Any, images: jax.Array) -> dict:
    """Outputs of the frozen teacher(s) on the augmented batch (inference mode; gradients are stopped by the
    caller). Default: one snapshot {'params', 'batch_stats'}."""
    return model.apply(frozen['params'], frozen['batch_stats'], images, train=False)[0]

  def make_train_step(self, model, phase: Phase, augment_fn: Callable, has_teacher: bool) -> Callable:
    """The pure `train_step(state, frozen, task, batch) -> (state, metrics)` of `phase` (jitted by the trainer).
    Default: one gradient step on `phase.loss` (`step.make_train_step`). Methods that need several updates per
    batch (e.g. IE-DML's alternating peers) return their own step with the same signature."""
    return make_train_step(model, self, phase, augment_fn, has_teacher)

  # ---- host-side hooks ----------------------------------------------------------------------------
  def train_indices(self, ctx: TaskContext) -> np.ndarray:
    """Examples of the main phase: the new classes' data plus the exemplar memory."""
    return np.concatenate([ctx.new_class_indices(), ctx.memory.indices()]).astype(np.int64)

  def before_task(self, ctx: TaskContext) -> TaskContext:
    return ctx

  def phases(self, ctx: TaskContext) -> list[Phase]:
    optim = first_task_optim(ctx.config.optim, ctx.task)
    return [Phase('train', self.loss, self.train_indices(ctx), optim)]

  def balancing_phases(self, ctx: TaskContext) -> list[Phase]:
    """Phases run after the memory update (class-balanced finetuning); none by default."""
    return []

  def after_task(self, ctx: TaskContext) -> TaskContext:
    if self.teacher == 'last':
      return ctx.replace(frozen=snapshot(ctx.state))
    return ctx


def first_task_optim(optim, task: int):
  """The optimiser config of task `task`: for task 0, every non-empty `first_task_<field>` replaces `<field>`
  (e.g. `first_task_epochs=200, first_task_milestones=(60, 120, 170)` as PyCIL's iCaRL)."""
  overrides = {k[len('first_task_'):]: v for k, v in optim.items() if k.startswith('first_task_') and v}
  if task != 0 or not overrides:
    return optim
  optim = optim.copy_and_resolve_references()
  with optim.unlocked():
    for k, v in overrides.items():
      optim[k] = v
  return optim


def with_imprinted_head(ctx: TaskContext, imprint: Callable, decision: str) -> TaskContext:
  """`ctx` with the head's class kernel of the current task's classes imprinted (LUCIR, PODNet): `imprint(kernel,
  features, labels, new_classes, old_classes) -> kernel` receives the head kernel and the inference-mode
  embeddings of the new classes' training images, computed with the current (previous task's) model. The kernel
  is NumPy computed on every host, whose BLAS or k-means may round differently: every process uses process 0's
  (`parallel.broadcast_decision` under `decision`, a `faults.DECISIONS` name)."""
  params, stats = ctx.state.params, ctx.state.batch_stats
  idx = ctx.new_class_indices()
  features = ctx.embed(params, stats, idx)
  lo, hi = ctx.class_range()
  kernel = imprint(np.asarray(jax.device_get(params['head']['kernel'])), features, ctx.train_labels[idx],
                   np.arange(lo, hi), np.arange(0, lo))
  kernel = parallel.broadcast_decision(kernel, decision, f'in task {ctx.task}')
  head = {**params['head'], 'kernel': parallel.replicate(kernel, ctx.mesh)}
  return ctx.replace(state=ctx.state.replace(params={**params, 'head': head}))
