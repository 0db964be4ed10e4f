"""`--list` (`incremental-jax --list`, `python main.py --list`): every method and every preset of every config file,
with its one-line docstring."""
import ast
import glob
import os
import subprocess
import sys

import pytest

from incremental_jax import listing
from incremental_jax.methods import METHODS
from incremental_jax.registry import Registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, 'configs')


def _valid_presets(module) -> list:
  """The presets a config file accepts, from its own error message for an unknown one."""
  with pytest.raises(ValueError, match="preset='no_such_preset' is not a preset; valid names") as e:
    module.get_config('no_such_preset')
  return ast.literal_eval(str(e.value).split('valid names: ')[1].split(']')[0] + ']')


def test_one_line():
  assert listing.one_line('LUCIR (Hou et al., CVPR 2019): cosine classifier.\n  More text. And more.') == (
      'LUCIR (Hou et al., CVPR 2019): cosine classifier.')
  assert listing.one_line('Two\n  lines without a stop\n\nsecond paragraph.') == 'Two lines without a stop'
  assert listing.one_line('x' * 200, width=20) == 'x' * 19 + '…'
  assert listing.one_line(None) == ''


@pytest.mark.parametrize('configs_dir', [None, CONFIGS], ids=['package', 'folder'])
def test_listing_names_every_method_and_preset(configs_dir):
  """The package's presets by module name (`--config=lucir:digits`), or a folder's config files by path."""
  text = listing.listing(configs_dir)
  lines = text.splitlines()
  for name, cls in METHODS.items():
    assert f'  {name:<{max(map(len, METHODS))}}  {listing.method_line(cls)}' in lines
  assert '  lucir           LUCIR (Hou et al., "Learning a Unified Classifier Incrementally via Rebalancing", ' \
         'CVPR 2019), as its official…' in lines        # the class says only "LUCIR.": its module's sentence
  modules = listing.config_modules(configs_dir)
  assert sorted(modules) == sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIGS, '*.py'))
                                   if not p.endswith('__init__.py'))
  for file, module in modules.items():
    assert module.__name__ == (f'incremental_jax.configs.{file}' if configs_dir is None else f'configs.{file}')
    shown = file if configs_dir is None else f'{os.path.relpath(CONFIGS)}/{file}.py'
    start = lines.index(f'  {shown}  {listing.one_line(module.__doc__)}')
    block = []
    for line in lines[start + 1:]:
      if not line.startswith('    '):
        break
      block.append(line.split()[0])
    # exactly the presets get_config accepts, each once, the default one starred
    assert sorted(p.rstrip('*') for p in block) == sorted(_valid_presets(module)), file
    assert sum(p.endswith('*') for p in block) == 1, file
  assert any(line.startswith('    cifar100_b50_s10*  ') for line in lines)       # finetune's default
  test_line = next(line for line in lines if line.startswith('    test ') and 'unit tests' in line)
  assert test_line.split(None, 1)[1] == (
      'digits, 4 base + 3 per step, cifar_resnet-8, 2 epochs. The digits protocol shrunk for unit tests: 3 tasks, '
      'tiny network, a few epochs, no plots or bars.')


def test_main_list_needs_no_config(monkeypatch):
  from incremental_jax import methods
  # without the methods other tests registered from outside the package
  builtin = {name: cls for name, cls in methods.METHODS.items() if cls.__module__.startswith('incremental_jax.')}
  monkeypatch.setattr(methods, 'METHODS', Registry(methods.METHODS.kind, builtin, methods.METHODS.hint))
  out = subprocess.run([sys.executable, 'main.py', '--list'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == listing.listing().strip()   # the package's presets (tests/test_cli.py: any command)
  missing = subprocess.run([sys.executable, 'main.py'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert missing.returncode != 0 and '--config is required (or --list)' in missing.stderr
