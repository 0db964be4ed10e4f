"""Train input throughput on a generated JPEG folder of ImageNet-like sizes: decode + RandomResizedCrop(224) +
horizontal flip + ColorJitter(brightness=63/255) + batching, incremental_jax's Grain loader (decode and crop in
worker processes, flip / jitter / normalisation as the device augmentation, jitted, here on the CPU) against a
torchvision DataLoader with the same transforms (RandomResizedCrop, RandomHorizontalFlip, ColorJitter, ToTensor,
Normalize) and the same number of worker processes; then how long a ResNet-18 train step (width --width) waits
for its batch when the Grain loader feeds it. Prints figures; asserts nothing.

    python benchmarks/input_pipeline.py                     # workers 1 .. all cores, 1024 images, batch 64
    python benchmarks/input_pipeline.py --images=2048 --workers=1,2,4,8 --batch=128

torchvision is needed only for the comparison (`pip install torch==2.13.0 --index-url
https://download.pytorch.org/whl/cpu`, `pip install --no-deps torchvision`); it runs in a child process that
has not imported JAX (its DataLoader forks). Without it the torchvision column reads 'n/a'.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BRIGHTNESS = 63 / 255
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_folder(root: str, n: int, classes: int = 8, seed: int = 0) -> str:
  """`n` JPEGs (quality 90) of 300..500 x 250..500 pixels under root/train/<class>/ (and one per class in
  val/): smooth colour fields with noise, closer to photographs in JPEG size than pure noise."""
  from PIL import Image
  marker = os.path.join(root, f'.done_{n}_{classes}')
  if os.path.exists(marker):
    return root
  rng = np.random.default_rng(seed)
  for split, count in (('train', n), ('val', classes)):
    for i in range(count):
      d = os.path.join(root, split, f'c{i % classes:02d}')
      os.makedirs(d, exist_ok=True)
      w, h = int(rng.integers(300, 501)), int(rng.integers(250, 501))
      yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
      base = np.stack([np.sin(xx * rng.uniform(2, 9) + rng.uniform(0, 6)) * np.cos(yy * rng.uniform(2, 9))
                       for _ in range(3)], -1)
      img = np.clip(128 + 90 * base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(img).save(os.path.join(d, f'{i:05d}.JPEG'), quality=90)
  open(marker, 'w').close()
  return root


def epoch_rows(n: int, batch: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).permutation(n)[:n // batch * batch].reshape(-1, batch)


def ours(root: str, workers: int, batch: int, seed: int = 0) -> dict:
  """images/s of one epoch through the Grain loader and the jitted device augmentation (flip, multiplicative
  brightness, normalisation); the first batch (worker start-up) is timed apart."""
  import jax
  from incremental_jax.config import base_config
  from incremental_jax.data import augment, image_folder
  cfg = base_config().data
  cfg.name, cfg.data_dir, cfg.image_size, cfg.resize, cfg.workers = 'image_folder', root, 224, 256, workers
  cfg.augment.random_resized_crop, cfg.augment.brightness, cfg.verify_images = True, BRIGHTNESS, False
  ds = image_folder.load_image_folder(cfg)
  aug = jax.jit(augment.make_augment_fn(cfg.augment, MEAN, STD))
  aug(jax.random.key(0), np.zeros((batch, 224, 224, 3), np.uint8)).block_until_ready()   # compiled before timing
  rows = epoch_rows(len(ds.train_labels), batch, seed)
  start = time.perf_counter()
  first = None
  for step, images in enumerate(ds.train_images.train_batches(rows)):
    aug(jax.random.fold_in(jax.random.key(seed), step), images).block_until_ready()
    if first is None:
      first = time.perf_counter()
  end = time.perf_counter()
  steady = (len(rows) - 1) * batch / (end - first) if len(rows) > 1 else float('nan')
  return {'images_per_s': steady, 'first_batch_s': first - start, 'epoch_s': end - start,
          'epoch_images_per_s': len(rows) * batch / (end - start)}


TORCH_CHILD = r'''
import json, sys, time
import numpy as np
import torch, torch.library
_register_fake, _register_autograd = torch.library.register_fake, torch.library.register_autograd
def _tolerant(register):   # torchvision's CUDA build registers fake kernels of ops the CPU torch lacks
  def wrapped(*args, **kwargs):
    try:
      decorate = register(*args, **kwargs)
    except RuntimeError:
      return lambda fn=None, *a, **k: fn
    if not callable(decorate):
      return decorate
    def apply(*a, **k):
      try:
        return decorate(*a, **k)
      except RuntimeError:
        return a[0] if a else None
    return apply
  return wrapped
torch.library.register_fake, torch.library.register_autograd = _tolerant(_register_fake), _tolerant(_register_autograd)
import torchvision
from torchvision import datasets, transforms
torch.library.register_fake, torch.library.register_autograd = _register_fake, _register_autograd
root, workers, batch, seed, brightness, mean, std = json.loads(sys.argv[1])
torch.set_num_threads(1)
tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                         transforms.ColorJitter(brightness=brightness), transforms.ToTensor(),
                         transforms.Normalize(mean, std)])
ds = datasets.ImageFolder(root + '/train', tf)
g = torch.Generator(); g.manual_seed(seed)
loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                                     generator=g, persistent_workers=False, prefetch_factor=2 if workers else None)
start = time.perf_counter(); first = None; n = 0
for x, y in loader:
  n += 1
  if first is None:
    first = time.perf_counter()
end = time.perf_counter()
print(json.dumps({'images_per_s': (n - 1) * batch / (end - first), 'first_batch_s': first - start,
                  'epoch_s': end - start, 'epoch_images_per_s': n * batch / (end - start),
                  'torchvision': torchvision.__version__}))
'''


def torchvision_rate(root: str, workers: int, batch: int, python: str, seed: int = 0) -> dict | None:
  args = json.dumps([root, workers, batch, seed, BRIGHTNESS, MEAN, STD])
  proc = subprocess.run([python, '-c', TORCH_CHILD, args], capture_output=True, text=True)
  if proc.returncode:
    print(f'  (torchvision run failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode})')
    return None
  return json.loads(proc.stdout.strip().splitlines()[-1])


def step_wait(root: str, workers: int, batch: int, width: int, steps: int, seed: int = 0) -> dict:
  """A ResNet-18 (width `width`, ImageNet stem) SGD step fed by the Grain loader: mean seconds per step spent
  waiting for the next batch, and the mean step time, after the first (compiling) step."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  import optax
  from incremental_jax.config import base_config
  from incremental_jax.data import augment, image_folder
  from incremental_jax.models.network import build_model
  cfg = base_config()
  dcfg = cfg.data
  dcfg.name, dcfg.data_dir, dcfg.image_size, dcfg.resize, dcfg.workers = 'image_folder', root, 224, 256, workers
  dcfg.augment.random_resized_crop, dcfg.augment.brightness, dcfg.verify_images = True, BRIGHTNESS, False
  ds = image_folder.load_image_folder(dcfg)
  mcfg = ml_collections.ConfigDict(cfg.model.to_dict())
  mcfg.backbone, mcfg.depth, mcfg.width, mcfg.stem = 'resnet', 18, width, 'imagenet'
  model = build_model(mcfg, ds.num_classes, (224, 224, 3))
  params, stats = model.init_variables()
  opt = optax.sgd(0.01, momentum=0.9)
  aug = augment.make_augment_fn(dcfg.augment, MEAN, STD)

  @jax.jit
  def train_step(params, stats, opt_state, images, labels, step):
    x = aug(jax.random.fold_in(jax.random.key(seed), step), images)

    def loss_fn(p):
      out, new_stats = model.apply(p, stats, x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(out['logits'], labels).mean(), new_stats

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  opt_state = opt.init(params)
  rows = epoch_rows(len(ds.train_labels), batch, seed)
  while len(rows) < steps:
    rows = np.concatenate([rows, epoch_rows(len(ds.train_labels), batch, seed + len(rows))])
  rows = rows[:steps]
  waits, times = [], []
  it = ds.train_images.train_batches(rows)
  for step in range(steps):
    t0 = time.perf_counter()
    images = next(it)
    t1 = time.perf_counter()
    params, stats, opt_state, loss = train_step(params, stats, opt_state, images,
                                                jnp.asarray(ds.train_labels[rows[step]]), step)
    loss.block_until_ready()
    t2 = time.perf_counter()
    if step:
      waits.append(t1 - t0)
      times.append(t2 - t1)
  return {'wait_s': float(np.mean(waits)), 'step_s': float(np.mean(times))}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--root', default='/tmp/incremental_jax_input_bench')
  parser.add_argument('--images', type=int, default=1024)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--workers', default='', help='comma-separated worker counts (default 1 .. all cores)')
  parser.add_argument('--torch_python', default=sys.executable, help='the interpreter with torch/torchvision')
  parser.add_argument('--width', type=int, default=8, help='ResNet-18 width of the step-wait measurement')
  parser.add_argument('--steps', type=int, default=6, help='steps of the step-wait measurement')
  args = parser.parse_args()
  cores = os.cpu_count() or 1
  counts = [int(w) for w in args.workers.split(',')] if args.workers else list(range(1, cores + 1))
  root = make_folder(args.root, args.images)
  print(f'{args.images} JPEGs (300-500 x 250-500) in {root}; batch {args.batch}; {cores} cores')
  print('images/s after the first batch (and over the whole epoch, worker start-up included)')
  print('workers | incremental_jax (Grain) | torchvision DataLoader | ratio (epoch ratio) | first batch ours / tv')
  for w in counts:
    a = ours(root, w, args.batch)
    b = torchvision_rate(root, w, args.batch, args.torch_python)
    mine = f'{a["images_per_s"]:.1f} ({a["epoch_images_per_s"]:.1f})'
    tv = f'{b["images_per_s"]:.1f} ({b["epoch_images_per_s"]:.1f})' if b else 'n/a'
    ratio = (f'{a["images_per_s"] / b["images_per_s"]:.2f}x ({a["epoch_images_per_s"] / b["epoch_images_per_s"]:.2f}x)'
             if b else 'n/a')
    first = f'{a["first_batch_s"]:.2f}s / {b["first_batch_s"]:.2f}s' if b else f'{a["first_batch_s"]:.2f}s'
    print(f'{w:7d} | {mine:>23} | {tv:>22} | {ratio:>19} | {first}', flush=True)
  w = counts[-1]
  r = step_wait(root, w, args.batch, args.width, args.steps)
  print(f'ResNet-18 width {args.width}, batch {args.batch}, {w} workers: step {r["step_s"]:.3f}s, waiting for '
        f'its batch {r["wait_s"]:.3f}s per step ({100 * r["wait_s"] / (r["wait_s"] + r["step_s"]):.0f}% of the time)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
