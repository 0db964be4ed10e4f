"""Train-step throughput: images/s of one jitted train step (ResNet-32, batch 128, 32x32x3, 100 classes) on the
current device(s), after compilation, and the compile time. Prints figures; asserts nothing.

    python benchmarks/train_step.py                       # finetune (CE) and iCaRL (CE + KD, with teacher)
    python benchmarks/train_step.py --methods=icarl --steps=50 --batch=256
    python benchmarks/train_step.py --loop                # also time the host input pipeline (sharded batches)
    python benchmarks/train_step.py --run=configs/lucir.py:digits --num_runs=4   # a whole run: wall time and
                                                          # the number of train steps it compiled
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from incremental_jax import backend_tuning, parallel, train
from incremental_jax.data import augment, pipeline
from incremental_jax.methods import METHODS
from incremental_jax.methods.base import Phase, snapshot
from incremental_jax.types import TaskInfo


def make_config(method: str, args):
  module = __import__(f'configs.{method}', fromlist=['get_config'])
  c = module.get_config('cifar100_b50_s10')
  c.optim.batch_size = args.batch
  c.model.depth = args.depth
  return c


def bench(method_name: str, args) -> dict:
  config = make_config(method_name, args)
  mesh = parallel.make_mesh()
  method = METHODS[method_name](config, 100, (32, 32, 3))
  model = method.model

  phase = Phase('train', method.loss, np.arange(args.batch), config.optim)
  aug = augment.make_augment_fn(config.data.augment, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
  has_teacher = method.teacher != 'none'
  step = jax.jit(train.make_train_step(model, method, phase, aug, has_teacher=has_teacher),
                 donate_argnums=(0,), out_shardings=(parallel.replicated(mesh),) * 2)
  state = train.init_train_state(model, mesh, train.make_optimizer(config.optim))
  frozen = parallel.replicate(jax.tree.map(jnp.copy, snapshot(state)), mesh) if has_teacher else None
  scen_masks = {'old': np.r_[np.ones(50), np.zeros(50)], 'new': np.r_[np.zeros(50), np.ones(5), np.zeros(45)]}
  scen_masks['seen'] = scen_masks['old'] + scen_masks['new']
  task = TaskInfo(index=jnp.int32(1), old=jnp.asarray(scen_masks['old'], jnp.float32),
                        new=jnp.asarray(scen_masks['new'], jnp.float32), seen=jnp.asarray(scen_masks['seen'], jnp.float32),
                        trainable=jnp.asarray(scen_masks['seen'], jnp.float32), lr=jnp.float32(0.1),
                        epochs=jnp.float32(160), steps_per_epoch=jnp.float32(390))
  task = parallel.replicate(task, mesh)
  rng = np.random.default_rng(0)
  n_images = args.batch * 8
  images = rng.integers(0, 255, (n_images, 32, 32, 3)).astype(np.uint8)
  labels = rng.integers(0, 55, n_images).astype(np.int32)
  batch = parallel.shard_batch(pipeline.gather(images, labels, np.arange(args.batch)), mesh, args.batch)

  t0 = time.perf_counter()
  compiled = step.lower(state, frozen, task, batch).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    state, metrics = compiled(state, frozen, task, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, frozen, task, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / args.steps
  out = {'method': method_name, 'compile_s': compile_s, 'step_s': step_s, 'images_per_s': args.batch / step_s}
  if args.loop:
    rows = pipeline.shuffle_sampler(np.arange(n_images), labels, args.batch, rng, drop_last=True)   # full batches
    rows = np.concatenate([rows] * (args.steps // len(rows) + 1))[:args.steps]
    t0 = time.perf_counter()
    for b in pipeline.device_batches(images, labels, rows, mesh):
      state, metrics = compiled(state, frozen, task, b)
    jax.block_until_ready(metrics)
    out['loop_images_per_s'] = args.batch * args.steps / (time.perf_counter() - t0)
  return out


def whole_run(spec: str, num_runs: int) -> None:
  """Runs a config (`path.py:preset`) end to end in a fresh workdir; prints wall time and compilations."""
  import importlib.util
  import tempfile
  from incremental_jax.run import train_and_evaluate
  path, _, preset = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(preset or None)
  config.num_runs, config.progress, config.plots = num_runs, False, False
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    results = train_and_evaluate(config, workdir)
    wall = time.perf_counter() - t0
  print(f'{spec} x{num_runs}: {wall:.1f} s wall (with compilation), {results["compilations"]} compiled train steps',
        flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--methods', default='finetune,icarl')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--depth', type=int, default=32)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--loop', action='store_true', help='also time steps fed by the host input pipeline')
  parser.add_argument('--run', default='', help='time a whole run of this config instead (path.py:preset)')
  parser.add_argument('--num_runs', type=int, default=1, help='with --run: runs trained together')
  args = parser.parse_args()
  backend_tuning.set_up()   # its XLA:CPU flags, before the first computation
  if args.run:
    whole_run(args.run, args.num_runs)
    return
  dev = jax.devices()[0]
  print(f'devices: {jax.device_count()} x {dev.device_kind} ({dev.platform}), host cores: {os.cpu_count()}, '
        f'jax {jax.__version__}')
  print(f'ResNet-{args.depth}, batch {args.batch}, 32x32x3 inputs, 100 classes')
  for name in args.methods.split(','):
    r = bench(name, args)
    line = (f"{r['method']:>10}: compile {r['compile_s']:6.2f} s   step {1000 * r['step_s']:8.1f} ms   "
            f"{r['images_per_s']:8.1f} images/s")
    if 'loop_images_per_s' in r:
      line += f"   with host pipeline {r['loop_images_per_s']:8.1f} images/s"
    print(line, flush=True)


if __name__ == '__main__':
  main()
