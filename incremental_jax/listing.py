"""What can be run: every method and every preset of every config file, each with its one-line docstring, and
the names every other named config field takes (`incremental-jax --list`, `python main.py --list` print
`listing()`). Everything listed is read from the registries the run looks names up in (`incremental_jax.registry`).

A config file's presets are its module's `PRESETS` dict, or `config.COMMON_PRESETS` for the files built on
the shared protocols alone. The files listed are the package's preset modules, `incremental_jax.configs.<name>`
(`--config=<name>:<preset>`; the repository's `configs/<name>.py` re-export them), or those of a folder of config
files given to `listing()`. A preset without a docstring is described by the config it builds.
"""
from __future__ import annotations

import glob
import importlib
import os
import re
import sys
from typing import Callable, Mapping, Optional

from incremental_jax import config as cfglib

WIDTH = 110   # characters of a docstring's first sentence shown
# a full stop followed by a space or the end, not after an abbreviation ("et al.", "e.g.", "i.e.", "vs.")
_SENTENCE_END = re.compile(r'(?<!\bal)(?<!\be\.g)(?<!\bi\.e)(?<!\bvs)\.(\s|$)')


def one_line(doc: Optional[str], width: int = WIDTH) -> str:
  """The first sentence of a docstring's first paragraph, on one line (cut at `width` characters)."""
  paragraph = ' '.join((doc or '').strip().split('\n\n')[0].split())
  end = _SENTENCE_END.search(paragraph)
  sentence = paragraph[:end.start() + 1] if end else paragraph
  return sentence if len(sentence) <= width else sentence[:width - 1].rstrip() + '…'


def method_line(cls) -> str:
  """A method class's first sentence, or its module's where the class's is only a name ("LUCIR.")."""
  line = one_line(cls.__doc__)
  return line if len(line.split()) > 1 else one_line(sys.modules[cls.__module__].__doc__)


def module_names(directory: str) -> list:
  """The names of the Python modules in `directory` (without `__init__`), sorted."""
  return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(directory, '*.py'))
                if os.path.basename(p) != '__init__.py')


def package_configs_dir() -> str:
  """The folder of the package's preset modules, `incremental_jax/configs` (wherever the package is installed)."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')


def config_modules(configs_dir: Optional[str] = None) -> dict:
  """{file name: imported module} of the config files in `configs_dir` (imported as the `configs` package), or
  by default the package's preset modules `incremental_jax.configs.<name>`."""
  if configs_dir is None:
    return {n: importlib.import_module(f'incremental_jax.configs.{n}') for n in module_names(package_configs_dir())}
  root = os.path.dirname(os.path.abspath(configs_dir))
  if root not in sys.path:
    sys.path.insert(0, root)
  package = os.path.basename(os.path.normpath(configs_dir))
  return {n: importlib.import_module(f'{package}.{n}') for n in module_names(configs_dir)}


def presets_of(module) -> Mapping[str, Callable]:
  return getattr(module, 'PRESETS', cfglib.COMMON_PRESETS)


def describe(config) -> str:
  """A preset's protocol in a few words, from the config it builds."""
  d, m, o = config.data, config.model, config.optim
  if int(d.increment) == 0:
    tasks = 'one task'
  else:
    tasks = f'{d.initial_classes or d.increment} base + {d.increment} per step'
  return f"{d.name}, {tasks}, {m.backbone}-{m.depth}, {o.epochs} epoch{'s' if int(o.epochs) != 1 else ''}"


def listing(configs_dir: Optional[str] = None) -> str:
  """The text of `--list`: the package's presets (`--config=<file>:<preset>`), or with `configs_dir` the config
  files of that folder (`--config=<configs_dir>/<file>.py:<preset>`)."""
  from incremental_jax.methods import METHODS
  from incremental_jax.validate import named_fields, named_key_fields
  lines = ['Methods (--config.method.name):']
  width = max(map(len, METHODS))
  lines += [f'  {name:<{width}}  {method_line(cls)}' for name, cls in METHODS.items()]
  if configs_dir is None:
    lines += ['', 'Config files and their presets (--config=<file>:<preset>, or --config=configs/<file>.py:<preset> '
                  'in the repository; * the default):']
  else:
    shown = os.path.relpath(configs_dir)
    lines += ['', f'Config files and their presets (--config={shown}/<file>.py:<preset>; * the default):']
  for name, module in config_modules(configs_dir).items():
    lines.append(f'  {name if configs_dir is None else f"{shown}/{name}.py"}  {one_line(module.__doc__)}')
    presets = presets_of(module)
    default = module.get_config().to_dict()
    width = max(map(len, presets)) + 2
    for preset, fn in presets.items():
      cfg = module.get_config(preset)
      mark = '*' if cfg.to_dict() == default else ''
      doc = one_line(fn.__doc__)
      lines.append(f'    {preset + mark:<{width}}  {describe(cfg)}' + (f'. {doc}' if doc else ''))
  lines += ['', 'Names of the other named fields (--config.<field>=<name>; method.aux_losses: the keys):']
  tables = {field: table for field, table in {**named_fields(), **named_key_fields()}.items() if field != 'method.name'}
  width = max(map(len, tables))
  lines += [f'  {field:<{width}}  {", ".join(table)}' for field, table in tables.items()]
  return '\n'.join(lines)
