"""Training: the loop that runs one phase of a task over its epochs, for one run or for several trained together.

`Trainer` compiles the pure step of `incremental_jax.step` once per distinct phase (`jax.jit`, state donated,
batch sharded over the mesh's 'data' axis, everything else replicated), alone or inside a chunk of K steps that
is one `lax.scan` (`make_chunk`; K = 1 on CPU, see `Trainer.chunk_length`), and for R > 1 runs its `jax.vmap`
over a leading run axis. `phase_epochs` is the one epoch loop, a generator that yields at each epoch end (the
caller decides checkpoints and stops): R = 1 runs the plain step, R > 1 the vmapped one; each run draws its own
batches, may start at its own epoch (resume), and keeps its own per-epoch metrics.
`SubnetworkTrainer` is the training service that the run hands to method hooks which train a network of their
own (a teacher, an autoencoder, a pruned snapshot): methods never build a trainer.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from incremental_jax import faults, parallel, preemption
from incremental_jax.data import pipeline
from incremental_jax.step import (advanced, augmented_batch, check_finite, head_update_mask,  # noqa: F401
                                  init_train_state, learning_rate, make_optimizer, make_task_info,
                                  make_train_step)
from incremental_jax.types import Phase, TaskInfo, TrainState


@dataclasses.dataclass(frozen=True)
class PhaseResult:
  state: TrainState
  epoch_metrics: tuple  # per epoch: {metric: mean over the epoch's steps}


@dataclasses.dataclass(frozen=True)
class EpochEnd:
  """What `phase_epochs` yields after epoch `epoch`: which runs trained in it (`live`), each run's per-epoch mean
  metrics so far (`histories`, the resumed epochs' included), and `states()`, the runs' train states now (unstacked
  on demand: only a checkpoint needs them)."""
  epoch: int
  live: np.ndarray
  histories: tuple
  states: Callable[[], list]


@dataclasses.dataclass(frozen=True)
class PhaseRun:
  """One run's share of a phase.

  Attributes:
    state, frozen: the run's train state and frozen pytree (teachers; None without one).
    task: the phase's `TaskInfo` (lr, epochs and steps per epoch are filled in by the loop).
    phase: the run's `Phase` (runs trained together have phases of one name and one optimiser section).
    labels: the run's train labels (class-order positions).
    rng_seed: the sampler seed prefix; epoch e draws from `np.random.default_rng(rng_seed + (e,))`.
    seed: the run's seed (`TaskInfo.seed`, which keys the augmentation).
    start_epoch: epochs before it are done: `state` is the one saved after epoch `start_epoch - 1` (its
      optimiser state and `phase_step` are kept); `phase.optim.epochs` means the run skips the phase.
    history: the per-epoch mean metrics of the epochs done before `start_epoch` (a resumed phase's).
  """
  state: TrainState
  frozen: Any
  task: TaskInfo
  phase: Phase
  labels: np.ndarray
  rng_seed: tuple
  seed: int
  start_epoch: int = 0
  history: tuple = ()


class Trainer:
  """Compiles and runs phases of one model and method: one compiled step per distinct phase (name, teacher
  present, static optimiser fields) and run count (one, or several vmapped); `compile_count` says how many
  were built."""

  def __init__(self, model, method, mesh, augment_fn: Callable, show_progress: bool = True):
    self.model, self.method, self.mesh = model, method, mesh
    self.augment_fn, self.show_progress = augment_fn, show_progress
    self._steps: dict = {}
    self._opt_init: dict = {}
    self.compile_count = 0

  @staticmethod
  def _step_key(phase: Phase, has_teacher: bool) -> tuple:
    # lr and epochs are traced (TaskInfo); every other optimiser field is baked into the compiled step.
    static_optim = tuple(sorted((k, str(v)) for k, v in phase.optim.items() if k not in ('lr', 'epochs')))
    return (phase.name, has_teacher, phase.train_backbone, phase.use_teacher, tuple(phase.frozen_params), static_optim)

  def compiled_step(self, phase: Phase, has_teacher: bool, group: bool = False):
    """The jitted step of `phase`; with `group`, the vmapped step over a leading run axis `(states, frozens,
    tasks, batches, valid [R]) -> (states, metrics)` in which runs whose `valid` is 0 keep their state."""
    return self._compiled(('group' if group else 'solo', self._step_key(phase, has_teacher)),
                          lambda: self._step(phase, has_teacher, group))

  def compiled_chunk(self, phase: Phase, has_teacher: bool, group: bool, on_device: bool):
    """The jitted chunk of `phase` (`make_chunk` over its step, vmapped and masked with `group`):
    `(state, frozen, task, source, xs, valid) -> (state, metrics)`, the state donated."""
    return self._compiled(('chunk', group, on_device, self._step_key(phase, has_teacher)),
                          lambda: make_chunk(self._step(phase, has_teacher, group), group, on_device, self.mesh))

  def _step(self, phase: Phase, has_teacher: bool, group: bool) -> Callable:
    """The method's pure step of `phase`; with `group`, vmapped over a leading run axis and masked by `valid`."""
    step = self.method.make_train_step(self.model, phase, self.augment_fn, has_teacher)
    return _masked_group_step(jax.vmap(step)) if group else step

  def _compiled(self, key: tuple, build: Callable[[], Callable]):
    """The jitted `build()` kept under `key` (state donated, outputs replicated), adding 1 to `compile_count`
    each time JAX traces it: once per program it compiles (a new phase, or new shapes), so `compile_count` is
    every compiled train program."""
    if key not in self._steps:
      fn = build()

      def traced(*args):
        self.compile_count += 1
        return fn(*args)

      repl = parallel.replicated(self.mesh)
      self._steps[key] = jax.jit(traced, donate_argnums=(0,), out_shardings=(repl, repl))
    return self._steps[key]

  def compiled_gather(self, group: bool, on_device: bool):
    """The jitted `(source, xs [1, ...]) -> batch` of a chunk of one step (`chunk_batch`), a program of its own
    so that the step it feeds is exactly `compiled_step`'s."""
    key = ('gather', group, on_device)
    if key not in self._steps:
      self._steps[key] = jax.jit(lambda source, xs: chunk_batch(
          source, jax.tree.map(lambda a: a[0], xs), group, on_device, self.mesh))
    return self._steps[key]

  def chunk_length(self, on_device: bool) -> int:
    """Train steps per compiled chunk: `data.chunk_steps`, or when 0: on CPU 1 (XLA:CPU runs a train step
    inside a loop body 2-3x slower than alone, measured on the digits model), on accelerators 64 with the images
    on the device (an epoch of up to 64 steps is one dispatch) and 4 with host images (a chunk's batches are
    loaded and sent together). The same on every process, as the program it shapes must be: the config, the
    platform of the mesh's first device (one device for all) and `on_device`, the placement that
    `pipeline.place_dataset` agrees across processes, are all it reads."""
    k = int(self.method.config.data.chunk_steps or 0)
    if k > 0:
      return k
    if self.mesh.devices.flat[0].platform == 'cpu':
      return 1
    return 64 if on_device else 4

  def epoch_plan(self, phase: Phase, labels: np.ndarray, rng_seed: tuple) -> list:
    """The sampler's index rows [steps, batch] of every epoch of `phase` (-1 for the padding of a last partial
    batch, `data.drop_last`); epoch e draws from `np.random.default_rng(rng_seed + (e,))`."""
    batch_size = int(phase.optim.batch_size)
    parallel.check_batch_divisible(batch_size)
    data_cfg = self.method.config.data
    sampler = pipeline.get_sampler(phase.sampler or data_cfg.sampler)
    sampler_kw = dict(data_cfg.sampler_kwargs or {})
    sampler_kw.setdefault('drop_last', bool(data_cfg.drop_last))
    return [sampler(phase.indices, labels[phase.indices], batch_size, np.random.default_rng(rng_seed + (e,)),
                    **sampler_kw) for e in range(int(phase.optim.epochs))]

  def phase_start(self, state: TrainState, phase: Phase) -> TrainState:
    """A phase starts with `phase_step` 0 and a fresh optimiser state."""
    return state.replace(phase_step=parallel.replicate(np.zeros((), np.int32), self.mesh),
                         opt_state=self.init_opt_state(phase, state.params))

  def init_opt_state(self, phase: Phase, params):
    if phase.name not in self._opt_init:
      self._opt_init[phase.name] = jax.jit(make_optimizer(phase.optim).init,
                                           out_shardings=parallel.replicated(self.mesh))
    return self._opt_init[phase.name](params)


def _masked_group_step(step: Callable) -> Callable:
  def group_step(state, frozen, task, batch, valid):
    new_state, metrics = step(state, frozen, task, batch)
    keep = lambda new, old: jnp.where(valid.reshape((-1,) + (1,) * (new.ndim - 1)) > 0, new, old)
    return jax.tree.map(keep, new_state, state), metrics
  return group_step


def _phase_task(task: TaskInfo, phase: Phase, steps_per_epoch: int, seed: int) -> TaskInfo:
  return task.replace(lr=jnp.float32(phase.optim.lr), epochs=jnp.float32(int(phase.optim.epochs)),
                      steps_per_epoch=jnp.float32(steps_per_epoch), seed=jnp.int32(seed))


def make_chunk(step: Callable, group: bool, on_device: bool, mesh) -> Callable:
  """The compiled loop over K train steps: `chunk(state, frozen, task, source, xs, valid) -> (state, metrics)`,
  one `lax.scan` whose iteration i takes step i of the chunk (one dispatch for K steps).

  `xs` holds per step the index rows [K, R, B] of R runs (R = 1 for one run) into `source` (the images and the
  runs' labels [R, N] on the device), from which each iteration gathers its batch (-1: padding of an epoch's last
  partial batch, weight 0; `chunk_batch`); with `on_device` False, `xs` is the gathered batches
  {'image': [K, R, B, ...], 'label': [K, R, B], 'weight': [K, R, B]} themselves and `source` is unused.
  `valid` [K, R]: 1 where run r takes step i. A step no run takes (the padded tail of an epoch shorter than a
  multiple of K) is skipped (`lax.cond`, its metrics 0), so epochs of any length reuse one program; with R > 1
  `step` is the vmapped, masked group step, which keeps the state of runs whose `valid` is 0.
  `metrics`: each metric stacked per step [K] (or [K, R])."""
  def chunk(state, frozen, task, source, xs, valid):
    def take(state, x, v):
      batch = chunk_batch(source, x, group, on_device, mesh)
      return step(state, frozen, task, batch, v) if group else step(state, frozen, task, batch)

    def body(state, inp):
      x, v = inp
      def skip(state, x, v):
        shapes = jax.eval_shape(take, state, x, v)[1]
        return state, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
      return jax.lax.cond(jnp.any(v > 0), take, skip, state, x, v)

    return jax.lax.scan(body, state, (xs, valid))

  return chunk


def chunk_batch(source, x, group: bool, on_device: bool, mesh) -> dict:
  """One step's batch of a chunk: with `on_device`, gathered from `source` (the device images and the runs'
  labels [R, N]) by the index rows `x` [R, B], a padding entry (-1) gathering example 0 with weight 0
  (`batch['weight']`, float32: 1 for a real example); else `x` is the batch itself (weights included). Sharded
  along B over the mesh's 'data' axis: [R, B, ...] for a group, [B, ...] for one run."""
  if on_device:
    idx = jnp.maximum(x, 0)
    batch = {'image': source['image'][idx], 'label': jnp.take_along_axis(source['label'], idx, axis=1),
             'weight': (x >= 0).astype(jnp.float32)}
  else:
    batch = x
  batch = jax.lax.with_sharding_constraint(
      batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, 'data')))
  return batch if group else jax.tree.map(lambda a: a[0], batch)


def run_phase(trainer: Trainer, runs: list, images, desc: str = '') -> list:
  """Trains the same phase of each `PhaseRun` in `runs` to its end (`phase_epochs`) and returns one
  `PhaseResult` per run."""
  runs = list(runs)
  states, histories = [r.state for r in runs], tuple(tuple(r.history) for r in runs)
  with contextlib.closing(phase_epochs(trainer, runs, images, desc)) as epochs:
    for end in epochs:
      states, histories = end.states(), end.histories
  return [PhaseResult(state=s, epoch_metrics=h) for s, h in zip(states, histories)]


def phase_epochs(trainer: Trainer, runs: list, images, desc: str = '') -> Iterator[EpochEnd]:
  """Trains the same phase of each `PhaseRun` in `runs` for `phase.optim.epochs` epochs over its
  `phase.indices`, yielding an `EpochEnd` after each epoch: the caller decides what an epoch end means (a mid-task
  checkpoint, a stop) and stops iterating to stop training.

  One run trains with the plain compiled step. Several are stacked on a leading run axis (states, teachers,
  task constants with their own seeds, batches) and updated by one vmapped step; run k draws its batches
  exactly as it would alone (its own labels, class order and sampler seed). When runs have different numbers
  of steps per epoch, or a run starts at a later epoch (resumed further), its update is discarded on the
  steps it does not take, so every run takes exactly its own steps.

  The steps run in compiled chunks of `Trainer.chunk_length` steps (`make_chunk`): an epoch is one or a few
  dispatches, whose batches are gathered on the device from `images` when it is `pipeline.DeviceImages`
  (else loaded on the host a chunk ahead). Progress bars and the 'train_step' fault point advance per chunk.

  Raises FloatingPointError, naming the global step (and the run, with several), when a loss is not finite;
  the check reads the epoch's metrics once at the epoch end, so it adds nothing to the compiled step.
  """
  mesh, phase = trainer.mesh, runs[0].phase
  epochs, group = int(phase.optim.epochs), len(runs) > 1
  plans = parallel.check_agreement([trainer.epoch_plan(r.phase, r.labels, r.rng_seed) for r in runs], 'epoch_plan',
                                   f'of task {int(runs[0].task.index)} phase {phase.name!r}')
  run_steps = np.array([len(plan[0]) if plan else 1 for plan in plans])
  starts = np.array([int(r.start_epoch) for r in runs])
  tasks = [_phase_task(r.task, phase, n, r.seed) for r, n in zip(runs, run_steps)]
  states = [r.state if r.start_epoch else trainer.phase_start(r.state, phase) for r in runs]
  has_teacher = runs[0].frozen is not None
  on_device = isinstance(images, pipeline.DeviceImages)
  if group:
    state, task = _stack(states), parallel.replicate(_stack(tasks), mesh)
    frozen = _stack([r.frozen for r in runs]) if has_teacher else None
  else:
    state, task, frozen = states[0], parallel.replicate(tasks[0], mesh), runs[0].frozen
  labels = np.stack([np.asarray(r.labels, np.int32) for r in runs])   # [R, N]
  source = {'image': images.device, 'label': parallel.replicate(labels, mesh)} if on_device else None
  steps, first = int(run_steps.max()), int(starts.min())
  k = trainer.chunk_length(on_device)
  if k == 1:
    # One step per dispatch: the batch gathered by its own small program, then the plain compiled step, so the
    # step's program (and its rounding) is the one of `compiled_step`.
    step_fn, gather_fn = trainer.compiled_step(phase, has_teacher, group), trainer.compiled_gather(group, on_device)
    chunk_fn = lambda state, frozen, task, source, xs, v: step_fn(
        state, frozen, task, gather_fn(source, xs), *((v[0],) if group else ()))
  else:
    chunk_fn = trainer.compiled_chunk(phase, has_teacher, group=group, on_device=on_device)
  padded = -(-steps // k) * k
  bar = _progress(epochs * steps, desc, trainer.show_progress)
  bar.update(first * steps)
  fault_per_step = faults.armed('train_step')
  histories = [list(r.history) for r in runs]
  try:   # the bar is closed however the loop ends (the caller stops iterating, or an error)
    for e in range(first, epochs):
      live = starts <= e
      valid = ((np.arange(padded)[:, None] < run_steps[None]) & live[None]).astype(np.float32)   # [padded, R]
      rows = np.stack([_padded(plan[e], padded) for plan in plans], 1).astype(np.int32)         # [padded, R, B]
      chunks = [rows[c:c + k] for c in range(0, padded, k)]
      inputs = (pipeline.host_chunks(images, labels, chunks, mesh) if not on_device else
                (parallel.host_input(c, mesh) for c in chunks))
      epoch_metrics = []
      for c, xs in enumerate(inputs):
        state, metrics = chunk_fn(state, frozen, task, source, xs, parallel.host_input(valid[c * k:(c + 1) * k], mesh))
        epoch_metrics.append(metrics)
        taken = min(k, steps - c * k)
        bar.update(taken)
        for _ in range(taken if fault_per_step else 0):
          faults.reached('train_step')
      join = jnp.stack if k == 1 else jnp.concatenate   # per-step metrics of single steps, or of chunks
      stacked = jax.tree.map(lambda *m: join(m)[:steps], *epoch_metrics)   # [steps, R] or [steps]
      if group:
        stacked = jax.device_get(stacked)
        means = [{name: float((v[:, r] * valid[:steps, r]).sum() / valid[:steps, r].sum())
                  for name, v in stacked.items()} if live[r] else None for r in range(len(runs))]
      else:
        means = [{name: float(v) for name, v in jax.device_get(jax.tree.map(jnp.mean, stacked)).items()}]
      for r, m in enumerate(means):
        if m is None:
          continue
        histories[r].append(m)
        if not np.isfinite(m['loss']):
          losses = np.asarray(jax.device_get(stacked['loss']))
          end_step = int(jax.device_get(state.step[r] if group else state.step))
          message = _non_finite_message(desc, losses[:run_steps[r], r] if group else losses, end_step, e)
          raise FloatingPointError(f'run {r}: {message}' if group else message)
      bar.set_postfix(epoch=e + 1, loss=' '.join(f"{h[-1]['loss']:.4f}" for h in histories if h), refresh=False)
      faults.reached('epoch_end')
      yield EpochEnd(epoch=e, live=live, histories=tuple(tuple(h) for h in histories),
                     states=lambda state=state: _unstack(state, len(runs)) if group else [state])
  finally:
    bar.close()


def _padded(rows: np.ndarray, length: int) -> np.ndarray:
  """An epoch's index rows [steps, B] padded to `length` rows by repeating its last one."""
  return np.concatenate([rows, np.repeat(rows[-1:], length - len(rows), 0)]) if length > len(rows) else rows


class SubnetworkTrainer:
  """The training service the run passes to method hooks (`TaskContext.trainer`): trains a network of a
  method's own (a teacher, an autoencoder, a pruned snapshot) on the run's mesh, with a `Trainer` per (method,
  model, augmentation) kept for the whole run, so a network trained after every task compiles once.

  Its compilations are counted apart from the run's (`compile_count`, results.json's
  `subnetwork_compilations`)."""

  def __init__(self, mesh, show_progress: bool):
    self.mesh, self.show_progress = mesh, show_progress
    self._trainers: dict = {}

  @property
  def compile_count(self) -> int:
    return sum(t.compile_count for t in self._trainers.values())

  def initial_state(self, model, optim) -> TrainState:
    """The initial train state of `model` (its initial variables, replicated over the mesh)."""
    return init_train_state(model, self.mesh, make_optimizer(optim))

  def train(self, method, model, phase: Phase, task: TaskInfo, labels: np.ndarray, images, augment_fn: Callable,
            rng_seed: tuple, seed: int, state: Optional[TrainState] = None, frozen: Any = None,
            desc: str = '') -> TrainState:
    """Trains `model` (from `state`, or its initial variables) on `phase` with `method`'s step and the
    augmentation `augment_fn`, and returns the final state; checks that it is finite."""
    key = (id(method), id(model), id(augment_fn))
    if key not in self._trainers:
      self._trainers[key] = Trainer(model, method, self.mesh, augment_fn, show_progress=self.show_progress)
    state = self.initial_state(model, phase.optim) if state is None else state
    run = PhaseRun(state=state, frozen=frozen, task=task, phase=phase, labels=labels, rng_seed=rng_seed, seed=seed)
    with contextlib.closing(phase_epochs(self._trainers[key], [run], images, desc=desc)) as epochs:
      for end in epochs:   # a stop request is honoured at an epoch end; after the last one, at the run's next
        state = end.states()[0]
        if end.epoch + 1 < int(phase.optim.epochs) and preemption.requested():
          raise preemption.StopRequested(f'while training {desc} (epoch {end.epoch + 1}; this network is trained '
                                         'again from its start on resume)')
    check_finite(state, desc)
    return state


def _stack(trees: list):
  """Pytrees of equal structure -> one pytree whose leaves are stacked on a new leading axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree, n: int) -> list:
  return [jax.tree.map(lambda x: x[k], tree) for k in range(n)]


def _non_finite_message(desc: str, step_losses: np.ndarray, end_step: int, epoch: int) -> str:
  """Names the first step of an epoch whose loss is not finite, by its global step (0-based: the number of
  steps taken before it in the run)."""
  i = int(np.flatnonzero(~np.isfinite(step_losses))[0])
  step = end_step - len(step_losses) + i
  return (f'{desc}: the loss became {step_losses[i]} at global step {step} (step {i + 1} of epoch {epoch + 1}); '
          'stopping. The last complete checkpoint is kept; lower optim.lr or check the data.')


def _progress(total: int, desc: str, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=desc, unit='step', leave=True, disable=not enabled or jax.process_index() != 0,
              dynamic_ncols=True)
