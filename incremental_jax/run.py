"""A whole class-incremental run: `train_and_evaluate(config, workdir) -> results`.

For each task: the method's hooks and phases (see `methods.base`), the exemplar memory update, evaluation
(CNN and NME), a checkpoint, and the result files. Running it again on the same workdir resumes after the
last completed task and produces the same results as an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from incremental_jax import checkpoint as ckpt_lib
from incremental_jax import evaluate as eval_lib
from incremental_jax import memory as memory_lib
from incremental_jax import metrics as metrics_lib
from incremental_jax import parallel
from incremental_jax import train as train_lib
from incremental_jax import validate
from incremental_jax.data import augment, scenario as scenario_lib, sources
from incremental_jax.methods import build_method
from incremental_jax.methods.base import TaskContext


@dataclasses.dataclass
class RunData:
  """The data of a run with labels remapped to class-order positions."""
  dataset: sources.Dataset
  scenario: scenario_lib.Scenario
  train_labels: np.ndarray
  test_labels: np.ndarray


def prepare_data(config) -> RunData:
  dataset = sources.load_dataset(config.data)
  scenario = scenario_lib.make_scenario(dataset.num_classes, config.data)
  return RunData(dataset, scenario, scenario.remap(dataset.train_labels), scenario.remap(dataset.test_labels))


def make_embed_fn(predict, images):
  """`embed(params, batch_stats, indices, flip=False)`: embeddings of train images by index."""
  def embed(params, batch_stats, indices, flip=False):
    return predict(params, batch_stats, eval_lib._take(images, np.asarray(indices)), flip=flip)['embedding']
  return embed


def update_memory(ctx: TaskContext, config) -> memory_lib.Memory:
  """iCaRL memory update after task t: shrink old classes to the new per-class budget, then select the new
  classes' exemplars from their train embeddings under the current model."""
  lo, hi = ctx.class_range()
  m = memory_lib.per_class_budget(config.memory, hi)
  memory = ctx.memory.reduced(m)
  for c in range(lo, hi):
    idx = np.flatnonzero(ctx.train_labels == c)
    feats = ctx.embed(ctx.state.params, ctx.state.batch_stats, idx)
    pos = memory_lib.select_exemplars(feats, m, config.memory.get('selection', 'herding'), seed=config.seed + c)
    memory = memory.with_class(c, idx[pos])
  return memory


def nme_class_means(ctx: TaskContext, config) -> np.ndarray:
  """Class means of the exemplars (and of their flipped copies when `memory.nme_flip`)."""
  idx = ctx.memory.indices()
  labels = ctx.train_labels[idx]
  feats = ctx.embed(ctx.state.params, ctx.state.batch_stats, idx)
  flipped = ctx.embed(ctx.state.params, ctx.state.batch_stats, idx, flip=True) if config.memory.get('nme_flip', True) else None
  return memory_lib.class_means(feats, labels, ctx.scenario.num_classes, flipped)


def _default_trainable(method, scenario, t: int) -> np.ndarray:
  masks = scenario.class_masks(t)
  return masks['new'] if method.freeze_old_classes else masks['seen']


def train_and_evaluate(config, workdir: str, *, show_progress: Optional[bool] = None) -> dict:
  """Runs (or resumes) the incremental protocol of `config`, writing checkpoints and results into `workdir`.

  Returns the results dict that is also written to `workdir/results.json`.
  """
  validate.validate_config(config)
  is_main = jax.process_index() == 0
  show_progress = config.get('progress', True) if show_progress is None else show_progress
  data = prepare_data(config)
  scenario, ds = data.scenario, data.dataset
  validate.validate_against_data(config, ds, scenario)
  mesh = parallel.make_mesh()
  method = build_method(config)
  model = method.build_model(scenario.num_classes, ds.image_shape)
  aug_fn = augment.make_augment_fn(config.data.augment, ds.mean, ds.std)
  preprocess = lambda images: augment.normalize(images, ds.mean, ds.std)
  predict = eval_lib.make_predict_fn(model, mesh, preprocess, int(config.eval.batch_size))
  embed = make_embed_fn(predict, ds.train_images)
  trainer = train_lib.Trainer(model, method, mesh, aug_fn, seed=config.seed, show_progress=show_progress)

  state = train_lib.init_train_state(model, mesh, train_lib.make_optimizer(config.optim))
  frozen, method_state, memory, steps = None, {}, memory_lib.Memory(), []
  checkpointer = ckpt_lib.RunCheckpointer(os.path.join(workdir, 'checkpoints'),
                                          max_to_keep=config.checkpoint.get('max_to_keep', 2))
  config_dict = json.loads(config.to_json_best_effort())
  start_task = 0
  latest = checkpointer.latest_step()
  if latest is not None:
    meta = checkpointer.restore_meta(latest)
    diffs = ckpt_lib.config_differences(meta['config'], config_dict)
    if diffs:
      raise ckpt_lib.CheckpointError(
          f'{workdir} holds a run with a different config; refusing to resume over it. Differences:\n  '
          + '\n  '.join(diffs[:20]) + '\nUse a new --workdir for a different run.')
    state, frozen, method_state, mem_arr = checkpointer.restore(latest, state, mesh)
    memory = memory_lib.Memory.from_array(mem_arr)
    steps, start_task = list(meta['steps']), int(meta['task']) + 1
    if is_main and show_progress:
      print(f'resuming {workdir} after task {start_task} of {scenario.num_tasks} (checkpoint step {latest})', flush=True)

  base_results = {'method': config.method.name, 'dataset': ds.name, 'num_tasks': scenario.num_tasks,
                  'class_order': scenario.order.tolist(), 'task_sizes': list(scenario.sizes), 'config': config_dict}
  for t in range(start_task, scenario.num_tasks):
    t0 = time.time()
    ctx = TaskContext(config=config, task=t, scenario=scenario, train_images=ds.train_images,
                      train_labels=data.train_labels, model=model, state=state, frozen=frozen,
                      method_state=method_state, memory=memory, embed=embed, predict=predict, mesh=mesh,
                      augment_fn=aug_fn, workdir=workdir)
    ctx = method.before_task(ctx)
    epoch_losses = {}
    ctx, epoch_losses = _run_phases(trainer, method, ctx, method.phases(ctx), data, epoch_losses)
    if method.uses_memory:
      ctx = dataclasses.replace(ctx, memory=update_memory(ctx, config))
    ctx, epoch_losses = _run_phases(trainer, method, ctx, method.balancing_phases(ctx), data, epoch_losses)
    ctx = method.after_task(ctx)
    train_seconds = time.time() - t0
    means = nme_class_means(ctx, config) if method.uses_memory else None
    record = eval_lib.evaluate_task(predict, ctx.state.params, ctx.state.batch_stats, ds.test_images,
                                    data.test_labels, scenario, t, means)
    lo, hi = ctx.class_range()
    record.update(step=t, num_classes=hi, classes=scenario.order[lo:hi].tolist(), memory_size=len(ctx.memory),
                  train_seconds=round(train_seconds, 3), epoch_losses=epoch_losses)
    steps.append(record)
    state, frozen, method_state, memory = ctx.state, ctx.frozen, ctx.method_state, ctx.memory
    meta = {'task': t, 'steps': steps, 'class_order': scenario.order.tolist(), 'config': config_dict}
    checkpointer.save(int(jax.device_get(state.step)), state, frozen, method_state,
                      memory.to_array(scenario.num_classes), meta)
    results = {**base_results, **metrics_lib.summarize(steps), 'steps': steps,
               'complete': t == scenario.num_tasks - 1}
    if is_main:
      metrics_lib.write_results(workdir, results, plots=config.get('plots', True))
      _print_step(record, config, show_progress)
  checkpointer.close()
  results = {**base_results, **metrics_lib.summarize(steps), 'steps': steps, 'complete': True,
             'compilations': trainer.compile_count}
  if is_main:
    metrics_lib.write_results(workdir, results, plots=config.get('plots', True))
    if show_progress:
      print(metrics_lib.format_summary(results), flush=True)
      print(f'results written to {os.path.join(workdir, "results.json")}', flush=True)
  return results


def _run_phases(trainer, method, ctx: TaskContext, phases, data: RunData, epoch_losses: dict):
  state = ctx.state
  for p_idx, phase in enumerate(phases):
    trainable = phase.trainable_classes
    if trainable is None:
      trainable = _default_trainable(method, ctx.scenario, ctx.task)
    task_info = train_lib.make_task_info(ctx.scenario, ctx.task, trainable)
    desc = f'task {ctx.task + 1}/{ctx.scenario.num_tasks} {phase.name}'
    result = trainer.run_phase(state, ctx.frozen, task_info, phase, ctx.train_images, data.train_labels,
                               rng_seed=(int(ctx.config.seed), ctx.task, len(epoch_losses)), desc=desc)
    state = result.state
    epoch_losses[phase.name] = [round(m['loss'], 6) for m in result.epoch_metrics]
  return dataclasses.replace(ctx, state=state), epoch_losses


def _print_step(record: dict, config, show_progress: bool) -> None:
  if not show_progress:
    return
  msg = f"step {record['step']}: {record['num_classes']} classes  CNN {record['cnn']['all']:.2f}%"
  if record.get('nme'):
    msg += f"  NME {record['nme']['all']:.2f}%"
  print(msg, flush=True)
