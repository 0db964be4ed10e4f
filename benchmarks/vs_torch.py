"""One LUCIR train step in incremental_jax against the same step written in PyTorch, on the same machine.

Both sides: CIFAR ResNet-32 (1x1 conv + BN shortcuts, no ReLU after the last block), cosine classifier over 100
classes with a learned scale, a frozen teacher copy run in inference mode, on-device random crop (padding 4) and
horizontal flip of a uint8 batch, loss = cross-entropy over the seen classes + adaptive-lambda less-forget
constraint + margin ranking loss (K=2, m=0.5), SGD with momentum 0.9 and weight decay 5e-4, at the task-1 point
of CIFAR-100 B50 (50 old classes, 5 new). The JAX side is the library's own compiled step (`Lucir` method,
`train.make_train_step`); the PyTorch side is written here for the benchmark only (PyTorch is not a dependency
of the library: `pip install torch --index-url https://download.pytorch.org/whl/cpu`).

After warm-up the two are timed alternately in rounds of `--steps` steps; the medians are printed as images/s
with their ratio. Prints figures; asserts nothing.

    python benchmarks/vs_torch.py                      # batch 128, 32x32x3
    python benchmarks/vs_torch.py --jax_only           # the JAX side alone (no PyTorch needed)
    python benchmarks/vs_torch.py --conv_lowering=xla  # XLA's plain convolutions (default: backend_tuning's choice)
    INCREMENTAL_JAX_XLA_CPU_FLAGS= python benchmarks/vs_torch.py   # without the XLA:CPU flags of backend_tuning
    python benchmarks/vs_torch.py --dtype=bfloat16     # mixed precision (accelerators)
"""
import argparse
import os

# PyTorch's OpenMP threads otherwise spin-wait after each step and take the cores from XLA's next step.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from incremental_jax import backend_tuning, parallel, train
from incremental_jax.data import augment, pipeline
from incremental_jax.methods import METHODS
from incremental_jax.methods.base import Phase, snapshot

NUM_CLASSES, OLD, NEW = 100, 50, 5
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


# ------------------------------------------------------------------------------------------- JAX side
def jax_step(args):
  module = __import__('configs.lucir', fromlist=['get_config'])
  config = module.get_config('cifar100_b50_s10')
  config.optim.batch_size = args.batch
  config.model.dtype = args.dtype
  if getattr(args, 'conv_lowering', ''):   # what backend_tuning.CONV_LOWERING gives this backend, replaced
    backend_tuning.CONV_LOWERING[jax.default_backend()] = args.conv_lowering
  mesh = parallel.make_mesh()
  method = METHODS['lucir'](config, NUM_CLASSES, (32, 32, 3))
  model = method.model
  phase = Phase('train', method.loss, np.arange(args.batch), config.optim)
  aug = augment.make_augment_fn(config.data.augment, MEAN, STD)
  step = jax.jit(train.make_train_step(model, method, phase, aug, has_teacher=True),
                 donate_argnums=(0,), out_shardings=(parallel.replicated(mesh),) * 2)
  state = train.init_train_state(model, mesh, train.make_optimizer(config.optim))
  frozen = parallel.replicate(jax.tree.map(jnp.copy, snapshot(state)), mesh)
  old = np.r_[np.ones(OLD), np.zeros(NUM_CLASSES - OLD)].astype(np.float32)
  new = np.r_[np.zeros(OLD), np.ones(NEW), np.zeros(NUM_CLASSES - OLD - NEW)].astype(np.float32)
  task = train.TaskInfo(index=jnp.int32(1), old=jnp.asarray(old), new=jnp.asarray(new),
                        seen=jnp.asarray(old + new), trainable=jnp.asarray(new), lr=jnp.float32(0.1),
                        epochs=jnp.float32(160), steps_per_epoch=jnp.float32(390))
  task = parallel.replicate(task, mesh)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (args.batch, 32, 32, 3)).astype(np.uint8)
  labels = rng.integers(0, OLD + NEW, args.batch).astype(np.int32)
  batch = parallel.shard_batch(pipeline.gather(images, labels, np.arange(args.batch)), mesh, args.batch)
  t0 = time.perf_counter()
  compiled = step.lower(state, frozen, task, batch).compile()
  compile_s = time.perf_counter() - t0
  holder = {'state': state}

  def run(n):
    for _ in range(n):
      holder['state'], metrics = compiled(holder['state'], frozen, task, batch)
    jax.block_until_ready(metrics)
    return metrics

  return run, compile_s, compiled


# --------------------------------------------------------------------------------------- PyTorch side
def torch_step(args):
  import torch
  import torch.nn as nn
  import torch.nn.functional as F

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)

  class Block(nn.Module):
    def __init__(self, cin, cout, stride, last):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                   if stride != 1 or cin != cout else None)
      self.last = last

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y)) + (x if self.down is None else self.down(x))
      return y if self.last else F.relu(y)

  class ResNet32Cosine(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
      self.bn = nn.BatchNorm2d(16)
      blocks, cin = [], 16
      for s, w in enumerate((16, 32, 64)):
        for b in range(5):
          blocks.append(Block(cin, w, 2 if s > 0 and b == 0 else 1, s == 2 and b == 4))
          cin = w
      self.blocks = nn.Sequential(*blocks)
      self.weight = nn.Parameter(torch.empty(NUM_CLASSES, 64).uniform_(-0.125, 0.125))
      self.sigma = nn.Parameter(torch.ones(()))

    def forward(self, x):
      f = self.blocks(F.relu(self.bn(self.conv(x)))).mean((2, 3))
      cosine = F.linear(F.normalize(f), F.normalize(self.weight))
      return f, cosine, self.sigma * cosine

  student, teacher = ResNet32Cosine(), ResNet32Cosine()
  teacher.load_state_dict(student.state_dict())
  teacher.eval()
  for p in teacher.parameters():
    p.requires_grad_(False)
  opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
  mean = torch.tensor(MEAN).view(1, 3, 1, 1)
  std = torch.tensor(STD).view(1, 3, 1, 1)
  rng = np.random.default_rng(0)
  images = torch.from_numpy(rng.integers(0, 255, (args.batch, 3, 32, 32)).astype(np.uint8))
  labels = torch.from_numpy(rng.integers(0, OLD + NEW, args.batch)).long()
  seen = torch.arange(NUM_CLASSES) < OLD + NEW
  lam = 5.0 * (OLD / NEW) ** 0.5
  rows = torch.arange(32)

  def augment_batch(x):
    b = x.shape[0]
    x = F.pad(x, (4, 4, 4, 4))
    oy, ox = torch.randint(0, 9, (b,)), torch.randint(0, 9, (b,))
    iy = (oy[:, None] + rows[None])[:, None, :, None].expand(b, 3, 32, 40)
    x = torch.gather(x, 2, iy)
    ix = (ox[:, None] + rows[None])[:, None, None, :].expand(b, 3, 32, 32)
    x = torch.gather(x, 3, ix)
    flip = torch.rand(b) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return (x.float() / 255.0 - mean) / std

  def one_step():
    x = augment_batch(images)
    with torch.no_grad():
      old_f, _, _ = teacher(x)
    f, cosine, logits = student(x)
    ce = F.cross_entropy(logits.masked_fill(~seen, float('-inf')), labels)
    lf = F.cosine_embedding_loss(f, old_f, torch.ones(x.shape[0]))
    is_old = labels < OLD
    if is_old.any():
      pos = cosine[is_old].gather(1, labels[is_old][:, None])
      hard = cosine[is_old][:, OLD:OLD + NEW].topk(2, dim=1)[0]
      mr = F.margin_ranking_loss(pos.expand_as(hard).reshape(-1), hard.reshape(-1),
                                 torch.ones(hard.numel()), margin=0.5)
    else:
      mr = torch.zeros(())
    loss = ce + lam * lf + mr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  def run(n):
    for _ in range(n):
      loss = one_step()
    return float(loss.detach())

  return run, torch.__version__


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=5, help='steps per timed round')
  parser.add_argument('--rounds', type=int, default=5, help='alternating rounds (median reported)')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--conv_lowering', default='', help="a lowering of models/conv.py ('' = backend_tuning's)")
  parser.add_argument('--dtype', default='float32', help='model.dtype: float32 or bfloat16 (compute)')
  parser.add_argument('--jax_only', action='store_true', help='time the JAX side only (no PyTorch needed)')
  args = parser.parse_args()
  backend_tuning.set_up()   # its XLA:CPU flags, before the first computation
  dev = jax.devices()[0]
  run_jax, compile_s, _ = jax_step(args)
  sides = {'jax': run_jax}
  torch_version = 'not run'
  if not args.jax_only:
    sides['torch'], torch_version = torch_step(args)
  print(f'JAX {jax.__version__} (jaxlib {jaxlib.__version__}) on {jax.device_count()} x {dev.device_kind} '
        f'({dev.platform}), XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; PyTorch {torch_version} on CPU with '
        f'{os.cpu_count()} threads; LUCIR step, ResNet-32, batch {args.batch}')
  print(f'jax compile {compile_s:.2f} s', flush=True)
  for fn in sides.values():
    fn(args.warmup)
  times = {name: [] for name in sides}
  cpu = []   # the process's CPU time per JAX step (all of XLA's threads): less moved than wall time by other load
  for r in range(args.rounds):
    for name, fn in sides.items():
      t0, c0 = time.perf_counter(), time.process_time()
      fn(args.steps)
      times[name].append((time.perf_counter() - t0) / args.steps)
      if name == 'jax':
        cpu.append((time.process_time() - c0) / args.steps)
    print(f'round {r + 1}: ' + '   '.join(f'{name} {1000 * t[-1]:7.1f} ms/step' for name, t in times.items()),
          flush=True)
  ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
  ips = {k: args.batch / statistics.median(v) for k, v in times.items()}
  line = (f'incremental_jax {ms["jax"]:7.1f} ms/step {ips["jax"]:7.1f} images/s '
          f'(CPU {1000 * statistics.median(cpu):7.1f} ms/step)')
  if 'torch' in ips:
    line += f'   PyTorch {ips["torch"]:7.1f} images/s   ratio {ips["jax"] / ips["torch"]:.2f}x'
  print(line)


if __name__ == '__main__':
  main()
