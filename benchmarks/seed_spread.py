"""Seed-to-seed spread of the digits presets and of a small image-folder protocol: each preset trained as one
`num_runs` group of N runs that differ only in their seed (`runs_vary='seed'`: the same class order, other initial
weights, batches and augmentations), then mean, standard deviation (numpy's, ddof=0) and range of the average
incremental accuracy over the runs, as `summary.json` of each group holds them.

What it answers: how far apart two seeds of the same protocol land, so that a user comparing one run with a
paper's number knows what a difference of a point means. `docs/protocols.md` quotes its table.

    python benchmarks/seed_spread.py                          # every digits preset + the image-folder protocol
    python benchmarks/seed_spread.py --presets=lucir.py:digits --runs=5 --no_image_folder
    python benchmarks/seed_spread.py --out=/tmp/spread        # workdirs kept there (a finished group is reused)

The image-folder protocol writes scikit-learn's digits as a class-folder tree of 32x32 RGB PNGs (each 8x8 digit
enlarged 4x, nearest neighbour; the digits presets' train/test split) and trains LUCIR on it through the
image-folder loader (`data.name='image_folder'`), with `--folder_epochs` epochs per task. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.compare_checkouts import PRESETS  # noqa: E402  (the digits presets compared elsewhere too)

FOLDER = 'image_folder'


def write_digits_folder(root: str, scale: int = 4) -> str:
  """The digits presets' train/test split as `<root>/{train,val}/<class>/<i>.png`, 8x8 enlarged `scale` times;
  returns `root` (kept when it exists)."""
  from PIL import Image
  import ml_collections
  from incremental_jax import config as cfglib
  from incremental_jax.data import sources
  if os.path.isdir(os.path.join(root, 'val')):
    return root
  cfg = cfglib.digits(cfglib.base_config()).data
  ds = sources.load_digits(ml_collections.ConfigDict(cfg.to_dict()))
  for split, images, labels in (('train', ds.train_images, ds.train_labels), ('val', ds.test_images, ds.test_labels)):
    for i, (image, label) in enumerate(zip(images, labels)):
      folder = os.path.join(root, split, f'class_{label}')
      os.makedirs(folder, exist_ok=True)
      big = np.repeat(np.repeat(image[..., 0], scale, 0), scale, 1)
      Image.fromarray(np.stack([big] * 3, -1)).save(os.path.join(folder, f'{i:04d}.png'))
  return root


def run_group(preset: str, workdir: str, runs: int, extra: list) -> dict:
  """`summary.json` of `preset` trained as one group of `runs` seeds (reused when the workdir holds it)."""
  path = os.path.join(workdir, 'summary.json')
  if not os.path.exists(path):
    cmd = [sys.executable, 'main.py', f'--config=configs/{preset}', f'--workdir={workdir}',
           f'--config.num_runs={runs}', '--config.runs_vary=seed', '--config.progress=False',
           '--config.plots=False', *extra]
    subprocess.run(cmd, cwd=ROOT, check=True)
  with open(path) as f:
    return json.load(f)


def row(name: str, summary: dict) -> str:
  cells = []
  for kind in ('cnn', 'nme'):
    values = [r['avg_incremental_accuracy'][kind] for r in summary['runs']]
    if any(v is None for v in values):
      cells.append('–')
      continue
    cells.append(f'{np.mean(values):.2f} ± {np.std(values):.2f} ({min(values):.2f}–{max(values):.2f})')
  return f"| {name} | {summary['num_runs']} | {cells[0]} | {cells[1]} |"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--presets', default=','.join(PRESETS))
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--out', default='/tmp/seed_spread')
  parser.add_argument('--no_image_folder', action='store_true')
  parser.add_argument('--folder_epochs', type=int, default=10)
  args = parser.parse_args()
  lines = ['| preset | seeds | avg incremental CNN: mean ± std (min–max) | NME |', '|---|---|---|---|']
  for preset in [p for p in args.presets.split(',') if p]:
    summary = run_group(preset, os.path.join(args.out, preset.replace('.py:', '_')), args.runs, [])
    lines.append(row(f'`{preset}`', summary))
    print(lines[-1], flush=True)
  if not args.no_image_folder:
    data_dir = write_digits_folder(os.path.join(args.out, 'digits_png'))
    extra = [f'--config.data.name={FOLDER}', f'--config.data.data_dir={data_dir}', '--config.data.image_size=32',
             '--config.data.resize=32', '--config.data.augment.crop_padding=4', '--config.data.workers=1',
             f'--config.optim.epochs={args.folder_epochs}', '--config.optim.milestones=()']
    summary = run_group('lucir.py:digits', os.path.join(args.out, 'lucir_digits_png'), args.runs, extra)
    lines.append(row(f'`lucir.py:digits` on a 32x32 PNG folder ({args.folder_epochs} epochs)', summary))
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
