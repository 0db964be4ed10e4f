"""Train input throughput on a generated JPEG folder of ImageNet-like sizes: decode + RandomResizedCrop(224) +
horizontal flip + ColorJitter(brightness=63/255) + batching, incremental_jax's Grain loader (decode and crop in
worker processes, flip / jitter / normalisation as the device augmentation, jitted, here on the CPU) against a
torchvision DataLoader with the same transforms (RandomResizedCrop, RandomHorizontalFlip, ColorJitter, ToTensor,
Normalize) and the same number of worker processes, over --epochs epochs of one loader each (our workers start
once; torchvision's once per epoch unless --tv_persistent); then how long a train step waits for its batch when
the Grain loader feeds it: the digits preset's step (CIFAR-style ResNet-8, 8x8 crops) and a ResNet-18 step (width
--width, 224x224). Prints figures; asserts nothing.

    python benchmarks/input_pipeline.py                     # workers 1 .. all cores, 1024 images, batch 64, 3 epochs
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


def _data_config(root: str, workers: int, image_size: int = 224, resize: int = 256):
  from incremental_jax.config import base_config
  cfg = base_config().data
  cfg.name, cfg.data_dir, cfg.image_size, cfg.resize, cfg.workers = 'image_folder', root, image_size, resize, workers
  cfg.augment.random_resized_crop, cfg.augment.crop_padding = True, 0
  cfg.augment.brightness, cfg.verify_images = BRIGHTNESS, False
  return cfg


def rates(batches_per_epoch: int, batch: int, times: list) -> dict:
  """Figures of `times` [epochs] of (start, first batch, end) wall-clock seconds: images/s after the first batch
  of epoch 1, over epoch 1 (worker start-up included), and over all epochs (start-up included once or per
  epoch, as the loader pays it)."""
  (start, first, end), n = times[0], batches_per_epoch * batch
  return {'images_per_s': (batches_per_epoch - 1) * batch / (end - first), 'first_batch_s': first - start,
          'epoch_images_per_s': n / (end - start),
          'run_images_per_s': len(times) * n / (times[-1][2] - start),
          'later_first_batch_s': float(np.mean([f - s for s, f, _ in times[1:]])) if len(times) > 1 else float('nan')}


def ours(root: str, workers: int, batch: int, epochs: int, device_aug: bool = True, seed: int = 0) -> dict:
  """`rates` of `epochs` epochs through one Grain loader (its workers persist from epoch to epoch) and, with
  `device_aug`, the jitted device augmentation (flip, multiplicative brightness, normalisation), here on the
  CPU beside the workers; without it, the host's share of a run whose accelerator augments."""
  import jax
  from incremental_jax.data import augment, image_folder
  cfg = _data_config(root, workers)
  ds = image_folder.load_image_folder(cfg)
  aug = jax.jit(augment.make_augment_fn(cfg.augment, MEAN, STD))
  aug(jax.random.key(0), np.zeros((batch, 224, 224, 3), np.uint8)).block_until_ready()   # compiled before timing
  times = []
  start = time.perf_counter()
  for e in range(epochs):
    rows = epoch_rows(len(ds.train_labels), batch, seed + e)
    first = None
    for step, images in enumerate(ds.train_images.train_batches(rows)):
      if device_aug:
        aug(jax.random.fold_in(jax.random.key(seed), e * len(rows) + step), images).block_until_ready()
      if first is None:
        first = time.perf_counter()
    end = time.perf_counter()
    times.append((start, first, end))
    start = end
  ds.train_images.close()
  return rates(len(rows), batch, times)


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
root, workers, batch, epochs, persistent, seed, brightness, mean, std = json.loads(sys.argv[1])
torch.set_num_threads(1)
tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                         transforms.ColorJitter(brightness=brightness), transforms.ToTensor(),
                         transforms.Normalize(mean, std)])
ds = datasets.ImageFolder(root + '/train', tf)
g = torch.Generator(); g.manual_seed(seed)
loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                                     generator=g, persistent_workers=persistent and workers > 0,
                                     prefetch_factor=2 if workers else None)
times = []
start = time.perf_counter()
for e in range(epochs):
  first = None; n = 0
  for x, y in loader:
    n += 1
    if first is None:
      first = time.perf_counter()
  end = time.perf_counter()
  times.append((start, first, end))
  start = end
print(json.dumps({'times': times, 'batches': n, 'torchvision': torchvision.__version__}))
'''


def torchvision_rate(root: str, workers: int, batch: int, epochs: int, persistent: bool, python: str,
                     seed: int = 0) -> dict | None:
  args = json.dumps([root, workers, batch, epochs, persistent, seed, BRIGHTNESS, MEAN, STD])
  proc = subprocess.run([python, '-c', TORCH_CHILD, args], capture_output=True, text=True)
  if proc.returncode:
    print(f'  (torchvision run failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode})')
    return None
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  return rates(out['batches'], batch, out['times'])


def step_wait(root: str, workers: int, batch: int, model: str, width: int, steps: int, seed: int = 0) -> dict:
  """A train step fed by the Grain loader: mean seconds per step spent waiting for the next batch, and the mean
  step time, over the second half of `steps` steps (the first compiles, while the workers fill their buffers). `model`: 'resnet18' (ResNet-18 of width `width`, ImageNet stem,
  224 x 224 RandomResizedCrops) or 'digits' (the model and image size of the `digits` preset, `configs/lucir.py`:
  a CIFAR-style ResNet-8 with a cosine head on 8 x 8 RandomResizedCrops: a step far cheaper than the decoding)."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  import optax
  from incremental_jax.config import base_config
  from incremental_jax.configs import lucir
  from incremental_jax.data import augment, image_folder
  from incremental_jax.models.network import build_model
  if model == 'digits':
    mcfg, size = ml_collections.ConfigDict(lucir.get_config('digits').model.to_dict()), 8
  else:
    mcfg, size = ml_collections.ConfigDict(base_config().model.to_dict()), 224
    mcfg.backbone, mcfg.depth, mcfg.width, mcfg.stem = 'resnet', 18, width, 'imagenet'
  dcfg = _data_config(root, workers, size, max(size, 256 * size // 224))
  ds = image_folder.load_image_folder(dcfg)
  net = build_model(mcfg, ds.num_classes, (size, size, 3))
  params, stats = net.init_variables()
  opt = optax.sgd(0.01, momentum=0.9)
  aug = augment.make_augment_fn(dcfg.augment, MEAN, STD)

  @jax.jit
  def train_step(params, stats, opt_state, images, labels, step):
    x = aug(jax.random.fold_in(jax.random.key(seed), step), images)

    def loss_fn(p):
      out, new_stats = net.apply(p, stats, x, train=True)
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
  ds.train_images.close()
  half = len(waits) // 2
  return {'wait_s': float(np.mean(waits[half:])), 'step_s': float(np.mean(times[half:]))}


def _cell(a: dict, b: dict | None, key: str) -> str:
  return f'{a[key]:.1f} / {b[key]:.1f} = {a[key] / b[key]:.2f}x' if b else f'{a[key]:.1f} / n/a'


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--root', default='/tmp/incremental_jax_input_bench')
  parser.add_argument('--images', type=int, default=1024)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--epochs', type=int, default=3, help='epochs per loader (its workers start once)')
  parser.add_argument('--workers', default='', help='comma-separated worker counts (default 1 .. all cores)')
  parser.add_argument('--torch_python', default=sys.executable, help='the interpreter with torch/torchvision')
  parser.add_argument('--tv_persistent', action='store_true',
                      help="torchvision's DataLoader with persistent_workers=True (default: False, as the official "
                           "code of PODNet, LUCIR and PyCIL)")
  parser.add_argument('--width', type=int, default=8, help='ResNet-18 width of the step-wait measurement')
  parser.add_argument('--steps', type=int, default=6, help='ResNet-18 steps of the step-wait measurement')
  parser.add_argument('--digits_steps', type=int, default=64, help='digits steps of the step-wait measurement')
  args = parser.parse_args()
  cores = os.cpu_count() or 1
  counts = [int(w) for w in args.workers.split(',')] if args.workers else list(range(1, cores + 1))
  root = make_folder(args.root, args.images)
  print(f'{args.images} JPEGs (300-500 x 250-500) in {root}; batch {args.batch}; {args.epochs} epochs; {cores} cores; '
        f'torchvision persistent_workers={args.tv_persistent}')
  print('images/s, incremental_jax (Grain) / torchvision DataLoader = ratio')
  print('workers | after the first batch     | epoch 1, start-up included | all epochs, start-up included | '
        'first batch ours / tv: epoch 1, later')
  print('(a row per worker count with the flip / jitter / normalisation jitted on this CPU, then one "-" with them '
        'left to the accelerator: the loader alone)')
  for w in counts:
    b = torchvision_rate(root, w, args.batch, args.epochs, args.tv_persistent, args.torch_python)
    for device_aug in (True, False):
      a = ours(root, w, args.batch, args.epochs, device_aug)
      first = (f'{a["first_batch_s"]:.2f}s / {b["first_batch_s"]:.2f}s, {a["later_first_batch_s"]:.2f}s / '
               f'{b["later_first_batch_s"]:.2f}s' if b else f'{a["first_batch_s"]:.2f}s, {a["later_first_batch_s"]:.2f}s')
      label = f'{w:7d}' if device_aug else f'{"-":>7}'
      print(f'{label} | {_cell(a, b, "images_per_s"):>25} | {_cell(a, b, "epoch_images_per_s"):>26} | '
            f'{_cell(a, b, "run_images_per_s"):>29} | {first}', flush=True)
  w = counts[-1]
  for model, label, steps in (('digits', 'digits step (CIFAR ResNet-8, 8x8 crops)', args.digits_steps),
                              ('resnet18', f'ResNet-18 width {args.width} (224x224)', args.steps)):
    r = step_wait(root, w, args.batch, model, args.width, steps)
    print(f'{label}, batch {args.batch}, {w} workers: step {r["step_s"]:.3f}s, waiting for its batch '
          f'{r["wait_s"]:.3f}s per step ({100 * r["wait_s"] / (r["wait_s"] + r["step_s"]):.0f}% of the time)',
          flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
