"""Runs the digits presets in two checkouts of incremental_jax and compares their results.json: a refactor must
leave every number identical (accuracy matrices, class order, memory sizes, per-epoch losses, compilations).

    python benchmarks/compare_checkouts.py --before=/path/to/old/checkout --after=. [--presets=lucir.py:digits,...]

Each preset runs in a fresh workdir under --out/<side>/<preset> with the checkout as working directory
(`python main.py --config=configs/<preset>`); a workdir that already holds a complete results.json is reused,
so the old side can be run once. Timing fields (train_seconds) are ignored. Prints one line per preset and
exits 1 when any differs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PRESETS = ('finetune.py:digits', 'icarl.py:digits', 'lwf.py:digits', 'lucir.py:digits', 'podnet.py:digits',
           'bake.py:lucir_digits', 'm2kd.py:digits', 'iekd.py:digits')
TIMING = ('train_seconds',)


def run_preset(checkout: str, preset: str, workdir: str) -> dict:
  path = os.path.join(workdir, 'results.json')
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
    if results.get('complete') and 'compilations' in results:
      return results
  cmd = [sys.executable, 'main.py', f'--config=configs/{preset}', f'--workdir={os.path.abspath(workdir)}',
         '--config.progress=False', '--config.plots=False', '--compilation_cache=']
  subprocess.run(cmd, cwd=checkout, check=True)
  with open(path) as f:
    return json.load(f)


def comparable(results: dict) -> dict:
  """results.json without timing fields, the config (its printed form may gain declared fields) and the
  environment (versions and devices: the same machine on both sides)."""
  steps = [{k: v for k, v in s.items() if k not in TIMING} for s in results['steps']]
  return {**{k: v for k, v in results.items() if k not in ('steps', 'config', 'environment')}, 'steps': steps}


def differences(a, b, path: str = '') -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k, '<absent>'), b.get(k, '<absent>'),
                                                                     f'{path}.{k}' if path else str(k))]
  if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
    return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f'{path}[{i}]')]
  return [] if a == b else [f'{path}: {a!r} vs {b!r}']


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--before', required=True)
  parser.add_argument('--after', default='.')
  parser.add_argument('--presets', default=','.join(PRESETS))
  parser.add_argument('--out', default='/tmp/compare_checkouts')
  parser.add_argument('--before_only', action='store_true', help='only run (and keep) the --before side')
  args = parser.parse_args()
  failed = 0
  for preset in args.presets.split(','):
    name = preset.replace('.py:', '_')
    before = run_preset(args.before, preset, os.path.join(args.out, 'before', name))
    if args.before_only:
      print(f'{preset}: before side written', flush=True)
      continue
    after = run_preset(args.after, preset, os.path.join(args.out, 'after', name))
    diffs = differences(comparable(before), comparable(after))
    failed += bool(diffs)
    print(f"{preset}: {'identical' if not diffs else f'{len(diffs)} differences, e.g. ' + '; '.join(diffs[:3])}",
          flush=True)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
