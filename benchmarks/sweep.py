"""A sweep as one command against the same runs as separate commands. Prints figures; asserts nothing.

The sweep: `configs/lucir.py:digits` over 2 loss weights (method.lambda_base) x 2 learning rates x 2 seeds, 8 runs.
Side A is one command, `main.py --config.sweep=SPEC` (one process; runs that differ only in numbers train as one
vmapped group); side B is the 8 runs as 8 commands one after another, each `main.py` with its overrides. Each side
starts with an empty persistent compilation cache of its own (`--cache=fresh`, the default: B's later commands
read what its earlier ones compiled, as a user's shell loop would) or none (`--cache=off`). Both sides' runs write
results.json; the script checks that they are the same 8 runs (same overrides) and prints each side's wall time
and runs per hour, and last the ratio:

    python benchmarks/sweep.py [--epochs=N] [--cache=fresh|off] [--keep=DIR]

`--epochs` shortens every run (a quick check that the script works; the figures are for the preset's 30).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AXES = (('method.lambda_base', (2.0, 5.0)), ('optim.lr', (0.05, 0.1)), ('seed', (0, 1)))
SPEC = ' * '.join(f"{field}={','.join(str(v) for v in values)}" for field, values in AXES)


def _points() -> list:
  points = [{}]
  for field, values in AXES:
    points = [{**p, field: v} for p in points for v in values]
  return points


def _command(workdir: str, cache: str, extra: list) -> list:
  return [sys.executable, 'main.py', '--config=configs/lucir.py:digits', f'--workdir={workdir}',
          '--config.progress=False', '--config.plots=False', '--config.tensorboard=False',
          f'--config.compilation_cache={cache}', *extra]


def _run(cmd: list) -> float:
  t0 = time.perf_counter()
  out = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True,
                       env={**os.environ, 'PYTHONPATH': HERE})
  seconds = time.perf_counter() - t0
  if out.returncode != 0:
    raise SystemExit(f'{" ".join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}')
  return seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--epochs', type=int, default=0, help='epochs per task (0: the preset\'s 30)')
  parser.add_argument('--cache', choices=('fresh', 'off'), default='fresh')
  parser.add_argument('--keep', default='', help='write the workdirs here and keep them (default: a temporary dir)')
  args = parser.parse_args()
  root = args.keep or tempfile.mkdtemp(prefix='sweep_bench_')
  extra = [f'--config.optim.epochs={args.epochs}'] if args.epochs else []
  cache = lambda side: os.path.join(root, f'cache_{side}') if args.cache == 'fresh' else ''
  points = _points()
  try:
    one = _run(_command(os.path.join(root, 'one_command'), cache('one'), [*extra, f'--config.sweep={SPEC}']))
    summary = json.loads(open(os.path.join(root, 'one_command', 'summary.json')).read())
    separate = 0.0
    for k, point in enumerate(points):
      flags = [f'--config.{field}={value}' for field, value in point.items()]
      separate += _run(_command(os.path.join(root, 'separate', f'run_{k}'), cache('separate'), [*extra, *flags]))
    separate_cfgs = [json.loads(open(os.path.join(root, 'separate', f'run_{k}', 'results.json')).read())['config']
                     for k in range(len(points))]
    for run, cfg, point in zip(summary['runs'], separate_cfgs, points):
      got = {'method.lambda_base': cfg['method']['lambda_base'], 'optim.lr': cfg['optim']['lr'], 'seed': cfg['seed']}
      assert run['overrides'] == point == got, (run['overrides'], point, got)
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
  n = len(points)
  groups = summary['train_groups']
  print(f'sweep {SPEC!r} of configs/lucir.py:digits ({n} runs, epochs {args.epochs or 30}, cache {args.cache})')
  print(f'one command: {one:.1f} s, {len(groups)} trained group(s), compilations '
        f"{[g.get('compilations') for g in groups]}: {n / one * 3600:.0f} runs per hour")
  print(f'{n} commands: {separate:.1f} s: {n / separate * 3600:.0f} runs per hour')
  print(f'sweep speed-up (runs per hour, one command / {n} commands) = {separate / one:.2f}x')


if __name__ == '__main__':
  main()
