"""Cost of BAKE's soft targets: the time of the knowledge-ensembling computation (affinity [B, B] + linear
solve of I - wA) against the batch size, and its share of a ResNet train step (BAKE step vs plain
cross-entropy step on the same batch). Prints figures; asserts nothing.

    python benchmarks/bake.py                                  # batches 128 ... 4096; steps at 128 and 512
    python benchmarks/bake.py --arch=resnet18 --step-batches=128,256,512,1024,2048,4096   # on a GPU
    python benchmarks/bake.py --dim=2048 --classes=1000 --arch=resnet50 --image=224      # ImageNet-sized
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
from incremental_jax.losses.bake import soft_targets
from incremental_jax.methods import build_method
from incremental_jax.methods.base import Phase
from incremental_jax.types import TaskInfo

ARCHS = {  # name: (backbone, depth, width, stem)
    'resnet32': ('cifar_resnet', 32, 16, 'cifar'),
    'resnet18': ('resnet', 18, 64, 'cifar'),
    'resnet50': ('resnet', 50, 64, 'imagenet'),
}


def timed(fn, *args, repeat: int) -> float:
  """Seconds per call of a jitted `fn` after compilation and one warm-up call (median of `repeat`)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeat):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def soft_target_seconds(batch: int, dim: int, classes: int, repeat: int) -> float:
  rng = np.random.default_rng(0)
  f = jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32)
  z = jnp.asarray(rng.normal(size=(batch, classes)), jnp.float32)
  return timed(jax.jit(lambda f, z: soft_targets(f, z, 4.0, 0.5)), f, z, repeat=repeat)


def step_seconds(method_name: str, batch: int, args) -> float:
  """Seconds per train step of `method_name` ('bake' or 'finetune') with the intra-class sampler's batch."""
  from configs import bake as bake_cfg
  config = bake_cfg.get_config('cifar100')
  config.method.name = method_name
  config.model.backbone, config.model.depth, config.model.width, config.model.stem = ARCHS[args.arch]
  config.optim.batch_size = batch
  mesh = parallel.make_mesh()
  shape = (args.image, args.image, 3)
  method = build_method(config, args.classes, shape)
  model = method.model
  phase = Phase('train', method.loss, np.arange(batch), config.optim)
  aug = augment.make_augment_fn(config.data.augment, (0.5,) * 3, (0.25,) * 3)
  step = jax.jit(train.make_train_step(model, method, phase, aug, has_teacher=False), donate_argnums=(0,),
                 out_shardings=(parallel.replicated(mesh),) * 2)
  state = train.init_train_state(model, mesh, train.make_optimizer(config.optim))
  ones = np.ones(args.classes, np.float32)
  task = parallel.replicate(TaskInfo(index=jnp.int32(0), old=jnp.zeros(args.classes), new=jnp.asarray(ones),
                                           seen=jnp.asarray(ones), trainable=jnp.asarray(ones), lr=jnp.float32(0.1),
                                           epochs=jnp.float32(200), steps_per_epoch=jnp.float32(1000)), mesh)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, args.classes, 4 * batch)
  rows = pipeline.intra_class_sampler(np.arange(len(labels)), labels, batch, rng, same_class_per_anchor=args.m)
  images = rng.integers(0, 255, (len(labels),) + shape).astype(np.uint8)
  b = parallel.shard_batch(pipeline.gather(images, labels, rows[0]), mesh, batch)
  state, metrics = step(state, None, task, b)  # compile
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.repeat):
    t0 = time.perf_counter()
    state, metrics = step(state, None, task, b)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batches', default='128,256,512,1024,2048,4096')
  parser.add_argument('--step-batches', default='128,512', help='batch sizes of the train-step comparison')
  parser.add_argument('--arch', default='resnet32', choices=sorted(ARCHS))
  parser.add_argument('--image', type=int, default=32)
  parser.add_argument('--dim', type=int, default=0, help='embedding size (0 = that of --arch)')
  parser.add_argument('--classes', type=int, default=100)
  parser.add_argument('--m', type=int, default=3, help='same-class partners per anchor in the step batches')
  parser.add_argument('--repeat', type=int, default=5)
  args = parser.parse_args()
  backend_tuning.set_up()   # its XLA:CPU flags, before the first computation
  backbone, depth, width, _ = ARCHS[args.arch]
  dim = args.dim or (4 * width if backbone == 'cifar_resnet' else width * 8 * (4 if depth >= 50 else 1))
  dev = jax.devices()[0]
  print(f'devices: {jax.device_count()} x {dev.device_kind} ({dev.platform}), host cores: {os.cpu_count()}, '
        f'jax {jax.__version__}')
  print(f'soft targets (affinity + solve), embedding {dim}, {args.classes} classes:')
  soft = {}
  for b in [int(x) for x in args.batches.split(',')]:
    soft[b] = soft_target_seconds(b, dim, args.classes, args.repeat)
    print(f'  batch {b:5d}: {1000 * soft[b]:9.3f} ms', flush=True)
  print(f'train step, {args.arch} on {args.image}x{args.image}x3, {args.classes} classes, M={args.m}:')
  for b in [int(x) for x in args.step_batches.split(',')]:
    t_bake, t_ce = step_seconds('bake', b, args), step_seconds('finetune', b, args)
    t_soft = soft[b] if b in soft else soft_target_seconds(b, dim, args.classes, args.repeat)
    print(f'  batch {b:5d}: BAKE step {1000 * t_bake:9.2f} ms, CE step {1000 * t_ce:9.2f} ms '
          f'(BAKE +{100 * (t_bake / t_ce - 1):5.1f}%); soft targets alone {1000 * t_soft:8.3f} ms = '
          f'{100 * t_soft / t_bake:5.2f}% of the BAKE step', flush=True)


if __name__ == '__main__':
  main()
