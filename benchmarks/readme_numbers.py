"""Regenerates the README's figures from runs: the quick start's sample output (what `python main.py
--config=configs/lucir.py:digits` prints) and the table "Results on the embedded digits" (each preset's
results.json), with the versions that computed them.

    python benchmarks/readme_numbers.py            # runs them, shows what differs from README.md, exit 1 if any
    python benchmarks/readme_numbers.py --write    # runs them and rewrites those blocks of README.md

Each block lies between `<!-- readme_numbers NAME ... -->` and `<!-- /readme_numbers NAME -->` in README.md;
nothing outside them is touched. The runs use fresh workdirs under --out (about 2-3 minutes on 2 CPU cores).
tests/test_readme_numbers.py checks, on the versions a block names, that the runs still give its numbers.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import platform
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
QUICK_START = 'lucir.py:digits'
QUICK_START_WORKDIR = 'runs/lucir_digits'   # the workdir of the README's command
# The rows of "Results on the embedded digits": (label, preset of configs/).
TABLE_ROWS = (('finetune', 'finetune.py:digits'), ('icarl', 'icarl.py:digits'), ('lucir', 'lucir.py:digits'),
              ('podnet', 'podnet.py:digits'), ('lucir+bake', 'bake.py:lucir_digits'))
BLOCKS = ('quick_start', 'digits_table')
ENV_PACKAGES = ('jax', 'jaxlib', 'numpy')
_BAR_TIMING = re.compile(r'\[\d+:\d\d<\d+:\d\d, *[\d.?]+ ?step/s')   # tqdm's elapsed<remaining, rate


def run_main(preset: str, workdir: str) -> tuple[str, dict]:
  """(stdout and stderr as one text, results.json) of `python main.py --config=configs/<preset>` in a fresh
  `workdir`, as a user runs it (progress bars on)."""
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, 'main.py', f'--config=configs/{preset}', f'--workdir={workdir}']
  out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env={**os.environ, 'PYTHONPATH': ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')})
  if out.returncode != 0:
    raise RuntimeError(f'{" ".join(cmd)} exited with {out.returncode}:\n{out.stdout[-3000:]}')
  with open(os.path.join(workdir, 'results.json')) as f:
    return out.stdout, json.load(f)


def shown_lines(output: str) -> list[str]:
  """The lines a terminal ends up showing: of each line, the last state of a progress bar (after its last \\r)."""
  return [line.split('\r')[-1].rstrip() for line in output.split('\n')]


def quick_start_output(output: str, workdir: str) -> str:
  """The README's excerpt of the quick start's output: the first task's finished progress bar and its line,
  '...', the last task's line, the summary and the results line (the workdir written as the README's)."""
  lines = [line.replace(workdir.rstrip('/'), QUICK_START_WORKDIR) for line in shown_lines(output)]
  bar = [line for line in lines if line.startswith('step 0/')][-1]   # its final state (a warning may cut it)
  steps = [line for line in lines if re.match(r'step \d+: ', line)]
  start = next(i for i, line in enumerate(lines) if re.match(r'\S+ on \S+: \d+ steps$', line))
  end = next(i for i in range(start, len(lines)) if lines[i].startswith('results written to'))
  return '\n'.join([bar, steps[0], '...', steps[-1], *lines[start:end + 1]])


def table_row(label: str, results: dict) -> str:
  """`| label | CNN/NME avg incremental | last | forgetting |`, two decimals, '-' where there is no NME."""
  def pair(key):
    return '/'.join('-' if results[key][k] is None else f'{results[key][k]:.2f}' for k in ('cnn', 'nme'))
  return f"| {label} | {pair('avg_incremental_accuracy')} | {pair('last_accuracy')} | {pair('average_forgetting')} |"


def digits_table(results_by_label: dict) -> str:
  return '\n'.join(['| method | avg incremental | last | forgetting |', '|---|---|---|---|',
                    *(table_row(label, results_by_label[label]) for label, _ in TABLE_ROWS)])


def environment_of(results: dict) -> dict:
  """{'jax': .., 'jaxlib': .., 'numpy': .., 'backend': .., 'machine': ..} of a run: what decides its rounding."""
  env = results['environment']
  return {**{k: env['versions'][k] for k in ENV_PACKAGES}, 'backend': env['backend'], 'machine': platform.machine()}


def current_environment() -> dict:
  """The same keys for this process (its default backend)."""
  import jax
  from incremental_jax import environment
  return {**{k: environment.versions(ENV_PACKAGES)[k] for k in ENV_PACKAGES}, 'backend': jax.default_backend(),
          'machine': platform.machine()}


def environment_line(env: dict) -> str:
  return (f"Computed with {', '.join(f'{k} {env[k]}' for k in ENV_PACKAGES)} on {env['backend']} "
          f"({env['machine']}); other versions may round differently.")


def parse_environment(block: str) -> dict:
  """The environment named by a block's `environment_line`."""
  m = re.search(r'Computed with (.*) on (\S+) \((\S+)\);', block)
  if m is None:
    raise ValueError('the block names no environment ("Computed with ...")')
  env = dict(item.split(' ', 1) for item in m.group(1).split(', '))
  return {**env, 'backend': m.group(2), 'machine': m.group(3)}


def render(name: str, body: str, env: dict) -> str:
  """The text of block `name` between its markers: `body` and the environment line."""
  if name == 'quick_start':
    body = f'```\n{body}\n```'
  return f'{body}\n\n{environment_line(env)}'


def _markers(name: str) -> tuple[re.Pattern, str]:
  return re.compile(rf'<!-- readme_numbers {name}\b[^>]*-->\n'), f'<!-- /readme_numbers {name} -->'


def block(readme: str, name: str) -> str:
  """The text of block `name` of the README (between its markers, without them)."""
  opening, closing = _markers(name)
  m = opening.search(readme)
  if m is None or closing not in readme[m.end():]:
    raise ValueError(f'README.md has no block {name!r} (<!-- readme_numbers {name} --> ... {closing})')
  return readme[m.end():readme.index(closing, m.end())].rstrip('\n')


def replace_block(readme: str, name: str, text: str) -> str:
  """The README with block `name` replaced by `text`."""
  old = block(readme, name)
  start = _markers(name)[0].search(readme).end()
  return readme[:start] + text + readme[start + len(old):]


def keep_timing(old: str, new: str) -> str:
  """`new` with the progress bar's times and rate of `old` (an idle machine's, not those of the regenerating run,
  which other work may slow down)."""
  m = _BAR_TIMING.search(old)
  return _BAR_TIMING.sub(lambda _: m.group(0), new) if m else new


def mask_timing(text: str) -> str:
  """`text` with the progress bar's times and rate replaced by a placeholder: they differ from run to run."""
  return _BAR_TIMING.sub('[TIME, RATE step/s', text)


def quick_start_block(readme: str) -> str:
  """The output lines the README shows for the quick start (the code block of its block)."""
  return re.search(r'```\n(.*?)\n```', block(readme, 'quick_start'), re.S).group(1)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--write', action='store_true', help='rewrite the blocks of README.md')
  parser.add_argument('--only', default=','.join(BLOCKS), help=f'comma-separated blocks of {BLOCKS}')
  parser.add_argument('--out', default='/tmp/readme_numbers', help='parent folder of the runs\' workdirs')
  args = parser.parse_args()
  names = args.only.split(',')
  with open(README) as f:
    readme = f.read()
  new, results = readme, {}
  if 'quick_start' in names:
    workdir = os.path.join(args.out, 'quick_start')
    output, results[QUICK_START] = run_main(QUICK_START, workdir)
    text = render('quick_start', quick_start_output(output, workdir), environment_of(results[QUICK_START]))
    new = replace_block(new, 'quick_start', keep_timing(block(readme, 'quick_start'), text))
  if 'digits_table' in names:
    for _, preset in TABLE_ROWS:
      if preset not in results:
        _, results[preset] = run_main(preset, os.path.join(args.out, preset.replace('.py:', '_')))
      print(f'{preset}: done', flush=True)
    envs = [environment_of(r) for r in results.values()]
    assert all(env == envs[0] for env in envs), envs
    table = digits_table({label: results[preset] for label, preset in TABLE_ROWS})
    new = replace_block(new, 'digits_table', render('digits_table', table, envs[0]))
  diff = list(difflib.unified_diff(mask_timing(readme).splitlines(), mask_timing(new).splitlines(), 'README.md',
                                   'from the runs', lineterm=''))
  print('\n'.join(diff) if diff else 'README.md shows what the runs give.')
  if args.write and new != readme:
    with open(README, 'w') as f:
      f.write(new)
    print('README.md rewritten.')
  return 1 if diff and not args.write else 0


if __name__ == '__main__':
  sys.exit(main())
