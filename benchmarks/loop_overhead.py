"""The host's share of a run. Prints figures and the issue-22 targets; asserts nothing.

Two measurements, each for the checkout on `--checkout` (default: this one), so that before/after is the same
script run against two checkouts:

1. Loop overhead (default): wall time per train step through the real loop (`train.run_phase`: sampler, batch
   gathering, dispatch, per-epoch metrics, progress bar) against the compiled step alone on the same batches
   (already on the device, dispatched back to back), for the digits model (LUCIR's digits preset: a tiny
   network, the regime an accelerator puts every model in) and the CIFAR ResNet-32 (batch 128, synthetic
   images). Target: loop <= 1.10x the compiled step on the digits model.

       python benchmarks/loop_overhead.py [--checkout=/path/to/other/checkout] [--models=digits,resnet32]

2. The quick start, `--quick_start`: `configs/lucir.py:digits` end to end in a child process, cold (empty
   compilation cache) then warm (the cache the cold run filled), its wall time split into imports, data,
   compilation (tracing, lowering and XLA compilation, from `jax.monitoring`), training, evaluation,
   exemplar selection and NME means, checkpoints, result files and the rest, with the peak RSS. Targets: cold
   <= 18 s, warm <= 10 s, peak RSS <= 700 MB.

       python benchmarks/loop_overhead.py --quick_start [--checkout=...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- 1. loop overhead ------------------------------------------------------------------------------------------
def _setup(model_name: str, steps: int):
  """(trainer, phase run factory, host images, device images or host images, labels) of one model."""
  import numpy as np
  from configs import lucir
  from incremental_jax import parallel, train
  from incremental_jax.data import augment, pipeline
  from incremental_jax.methods import build_method
  from incremental_jax.methods.base import Phase
  from incremental_jax.step import make_task_info
  from incremental_jax.data.scenario import make_scenario

  if model_name == 'digits':
    config = lucir.get_config('digits')
    shape, classes = (8, 8, 1), 10
  else:
    config = lucir.get_config('cifar100_b50_s10')
    shape, classes = (32, 32, 3), 100
  config.progress = False
  batch = int(config.optim.batch_size)
  n = batch * steps
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (n,) + shape).astype(np.uint8)
  labels = (np.arange(n) % config.data.initial_classes).astype(np.int64)
  mesh = parallel.make_mesh()
  method = build_method(config, classes, shape)
  aug = augment.make_augment_fn(config.data.augment, (0.5,) * shape[-1], (0.25,) * shape[-1])
  trainer = train.Trainer(method.model, method, mesh, aug, show_progress=False)
  optim = config.optim.copy_and_resolve_references()
  with optim.unlocked():
    optim.epochs = 1
  phase = Phase('train', method.loss, np.arange(n), optim)
  scenario = make_scenario(classes, config.data)
  task = make_task_info(scenario, 0, scenario.class_masks(0)['seen'])
  placed = pipeline.DeviceImages(images, mesh) if hasattr(pipeline, 'DeviceImages') else images

  def part(state):
    return train.PhaseRun(state=state, frozen=None, task=task, phase=phase, labels=labels, rng_seed=(0, 0, 0), seed=0)

  init = lambda: train.init_train_state(method.model, mesh, train.make_optimizer(optim))
  return trainer, part, init, images, placed, labels, phase, task, mesh


def loop_overhead(model_name: str, steps: int, repeats: int) -> dict:
  import jax
  import numpy as np
  from incremental_jax import parallel, train
  from incremental_jax.data import pipeline

  trainer, part, init, images, placed, labels, phase, task, mesh = _setup(model_name, steps)
  # the loop: run_phase over one epoch of `steps` steps; the first call compiles
  state = init()
  (res,) = train.run_phase(trainer, [part(state)], placed)
  jax.block_until_ready(res.state.params)
  loop = []
  for _ in range(repeats):
    state = res.state
    t0 = time.perf_counter()
    (res,) = train.run_phase(trainer, [part(state)], placed)
    jax.block_until_ready(res.state.params)
    loop.append((time.perf_counter() - t0) / steps)
  # the compiled step alone, on the epoch's batches already on the device
  rows = trainer.epoch_plan(phase, labels, (0, 0, 0))[0]
  weighted = hasattr(pipeline, 'batch_weight')   # checkouts whose loop gives the step per-example weights
  batches = [parallel.shard_batch({**pipeline.gather(images, labels, r),
                                   **({'weight': pipeline.batch_weight(r)} if weighted else {})}, mesh, len(r))
             for r in rows]
  step = trainer.compiled_step(phase, False)
  info = parallel.replicate(train._phase_task(task, phase, len(rows), 0), mesh)
  state = trainer.phase_start(res.state, phase)
  state, m = step(state, None, info, batches[0])
  jax.block_until_ready(m)
  alone = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for b in batches:
      state, m = step(state, None, info, b)
    jax.block_until_ready((state.params, m))
    alone.append((time.perf_counter() - t0) / len(batches))
  loop_s, alone_s = float(np.median(loop)), float(np.median(alone))
  return {'model': model_name, 'steps': steps, 'loop_ms': 1e3 * loop_s, 'step_ms': 1e3 * alone_s,
          'ratio': loop_s / alone_s}


# ---- 2. the quick start, split ---------------------------------------------------------------------------------
CATEGORIES = ('imports', 'data', 'compilation', 'training', 'evaluation', 'exemplars', 'checkpoints', 'results',
              'other')


def quick_start_child(config_spec: str, cache: str) -> dict:
  """Runs the quick start in this process (compilation cache `cache`) with timers (exclusive time per category) and returns the split."""
  t_start = time.perf_counter()
  import jax
  import incremental_jax
  from incremental_jax import evaluate as eval_lib
  from incremental_jax import memory as memory_lib
  from incremental_jax import metrics as metrics_lib
  from incremental_jax import store as store_lib
  from incremental_jax import task_stages
  from incremental_jax import train as train_lib
  from incremental_jax.data import sources
  times = dict.fromkeys(CATEGORIES, 0.0)
  times['imports'] = time.perf_counter() - t_start
  stack = []   # [category, start] of the active timers, innermost last

  def timed(category, fn):
    def wrapper(*args, **kwargs):
      now = time.perf_counter()
      if stack:
        times[stack[-1][0]] += now - stack[-1][1]
      stack.append([category, now])
      try:
        return fn(*args, **kwargs)
      finally:
        end = time.perf_counter()
        times[category] += end - stack.pop()[1]
        if stack:
          stack[-1][1] = end
    return wrapper

  def on_duration(event, duration, **kwargs):
    del kwargs
    if event in ('/jax/core/compile/jaxpr_trace_duration', '/jax/core/compile/jaxpr_to_mlir_module_duration',
                 '/jax/core/compile/backend_compile_duration'):
      times['compilation'] += duration
      if stack:   # exclusive: taken out of the category that compiled
        times[stack[-1][0]] -= duration

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  sources.load_dataset = timed('data', sources.load_dataset)
  task_stages.train_stage = timed('training', task_stages.train_stage)
  train_lib.SubnetworkTrainer.train = timed('training', train_lib.SubnetworkTrainer.train)
  eval_lib.evaluate_task = timed('evaluation', eval_lib.evaluate_task)
  memory_lib.update_memory = timed('exemplars', memory_lib.update_memory)
  memory_lib.exemplar_class_means = timed('exemplars', memory_lib.exemplar_class_means)
  store_lib.RunStore.save = timed('checkpoints', store_lib.RunStore.save)
  store_lib.RunStore.close = timed('checkpoints', store_lib.RunStore.close)
  metrics_lib.write_results = timed('results', metrics_lib.write_results)
  import importlib
  module, _, preset = config_spec.partition(':')
  config = importlib.import_module(f"configs.{module.removesuffix('.py')}").get_config(preset or 'digits')
  config.progress = False
  if 'compilation_cache' in config:   # the checkout's own cache setting, as main.py uses it
    config.compilation_cache = cache
  else:                                # a checkout from before the field: the cache its main.py set up
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    incremental_jax.train_and_evaluate(config, workdir)
    run_s = time.perf_counter() - t0
  import resource
  accounted = sum(v for k, v in times.items() if k not in ('imports', 'other'))
  times['other'] = run_s - accounted
  return {'seconds': times, 'in_process_s': time.perf_counter() - t_start,
          'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def quick_start(checkout: str, config_spec: str) -> list:
  out = []
  with tempfile.TemporaryDirectory() as cache:
    for label in ('cold', 'warm'):
      cmd = [sys.executable, os.path.abspath(__file__), f'--checkout={checkout}', f'--cache={cache}', '--child',
             config_spec]
      t0 = time.perf_counter()
      proc = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True, check=True)
      wall = time.perf_counter() - t0
      res = json.loads(proc.stdout.strip().splitlines()[-1])
      res.update(label=label, wall_s=wall)
      out.append(res)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkout', default=HERE, help='the checkout of incremental_jax to measure')
  parser.add_argument('--models', default='digits,resnet32')
  parser.add_argument('--steps', type=int, default=0, help='steps per timed epoch (0: 64 digits, 8 resnet32)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--quick_start', action='store_true', help='time the quick start instead, cold and warm')
  parser.add_argument('--config', default='lucir.py:digits')
  parser.add_argument('--child', default='', help=argparse.SUPPRESS)
  parser.add_argument('--cache', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  sys.path.insert(0, os.path.abspath(args.checkout))   # that checkout's incremental_jax and configs/
  if args.child:
    print(json.dumps(quick_start_child(args.child, args.cache)))
    return
  if args.quick_start:
    for r in quick_start(args.checkout, args.config):
      split = '  '.join(f'{k} {v:.1f}' for k, v in r['seconds'].items())
      target = 18 if r['label'] == 'cold' else 10
      print(f"quick start {args.config} {r['label']}: {r['wall_s']:.1f} s wall (target <= {target} s), peak RSS "
            f"{r['peak_rss_mb']:.0f} MB (target <= 700)\n  {split}", flush=True)
    return
  try:   # that checkout's XLA:CPU flags, before the first computation
    from incremental_jax.backend_tuning import set_up
  except ImportError:   # a checkout from before `set_up`: importing the package set them
    import incremental_jax  # noqa: F401
  else:
    set_up()
  import jax
  dev = jax.devices()[0]
  print(f'{args.checkout}: {jax.device_count()} x {dev.device_kind} ({dev.platform}), jax {jax.__version__}')
  for name in args.models.split(','):
    steps = args.steps or (64 if name == 'digits' else 8)
    r = loop_overhead(name, steps, args.repeats)
    target = '  (target <= 1.10x)' if name == 'digits' else ''
    print(f"{name}: through the loop {r['loop_ms']:.2f} ms/step, compiled step alone {r['step_ms']:.2f} ms/step: "
          f"{r['ratio']:.2f}x{target}", flush=True)


if __name__ == '__main__':
  main()
