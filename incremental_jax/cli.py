"""The command line. `incremental-jax` (the console script `pip install` makes), `python -m incremental_jax` and the
repository's `python main.py` are all `main()`: the same flags, the same behaviour.

    incremental-jax --config=lucir:digits --workdir=runs/lucir_digits
    python main.py --config=configs/lucir.py:digits --workdir=runs/lucir_digits      # in the repository

`--config` is a config file with an optional preset (`path/to/file.py:preset`), or the name of one of the
package's preset modules (`lucir:digits` is `incremental_jax/configs/lucir.py:digits`; a file of that name in the
current directory comes first). Config files are imported with the current directory on `sys.path`, as
`python main.py` run from the repository has it (`examples/custom_method/config.py` imports `examples`). Every
config field can be overridden, e.g. `--config.optim.lr=0.05 --config.data.data_dir=/data`. Running again with the
same --workdir resumes from the last complete checkpoint. `--list` prints every method and every preset.

Several processes (one per host on a GPU cluster or TPU pod, or CPU processes on one machine) join through
JAX's distributed runtime: with --coordinator_address/--num_processes/--process_id (or the environment
variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or with --distributed, which lets
`jax.distributed.initialize()` detect the cluster (SLURM, Open MPI, Cloud TPU pods, Kubernetes). Every
process runs the same command; process 0 writes the results.

A mistake in the command line (an unknown preset or config field, a value of the wrong type) or an invalid config,
data set or workdir stops the run before training with one line on stderr and exit status 2. SIGTERM (a
preemption notice) makes the run checkpoint at its next epoch boundary, print one line on stderr and exit with
status 75 (`incremental_jax.preemption`); the same command resumes it. `main()` installs that SIGTERM handler
before anything else (flag parsing, importing JAX, joining the distributed runtime, whose own preemption service
is turned off so that it cannot take the signal), so a SIGTERM received while the run starts up is not lost: the
run stops at its first boundary. When another process of the run dies, the survivors print one line (the lost
process, the checkpoint the same command resumes from) and exit with status 75 at once (`os._exit`: JAX's
shutdown barrier would wait for the dead process).
"""
from __future__ import annotations

import copy
import functools
import os
import sys
import types
from typing import Optional, Sequence

from incremental_jax import preemption

# the shorthand flags that set a top-level config field of the same name
SHORTHANDS = ('compilation_cache', 'sweep')


@functools.cache
def define_flags() -> types.SimpleNamespace:
  """Registers the command line's flags with absl's global flag table (once per process); returns their holders."""
  from absl import flags
  from ml_collections import config_flags
  holders = types.SimpleNamespace(
      config=config_flags.DEFINE_config_file(
          'config', None, 'Config file, optionally with a preset: file.py:preset; or a preset module of the package '
          'by name: lucir:digits (see --list).', lock_config=True),
      workdir=flags.DEFINE_string('workdir', None, 'Directory for checkpoints and results (resumed if it exists); '
                                  'default runs/<method>_<data set>.'),
      coordinator_address=flags.DEFINE_string('coordinator_address', None,
                                              'host:port of process 0 (multi-process runs).'),
      num_processes=flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process runs).'),
      process_id=flags.DEFINE_integer('process_id', None, 'Index of this process (multi-process runs).'),
      distributed=flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() and let JAX detect the '
                                    'cluster (SLURM, Open MPI, Cloud TPU pod, Kubernetes); implied by the flags '
                                    'above.'),
      compilation_cache=flags.DEFINE_string(
          'compilation_cache', None,
          'Shorthand for --config.compilation_cache: the persistent XLA compilation cache directory (default '
          '~/.cache/incremental_jax/xla; re-runs and resumes skip compilation); empty disables it. '
          'JAX_COMPILATION_CACHE_DIR, when set, takes precedence.'),
      sweep=flags.DEFINE_string('sweep', None, 'Shorthand for --config.sweep: the hyperparameter sweep to run.'),
      list=flags.DEFINE_bool('list', False, 'Print every method and every preset of the package, then exit.'),
  )
  flags.register_multi_flags_validator(['config', 'list'], lambda f: f['config'] is not None or f['list'],
                                       '--config is required (or --list).')
  return holders


def main(argv: Optional[Sequence[str]] = None) -> None:
  """The entry point (`incremental-jax`, `python -m incremental_jax`, `python main.py`); `argv` defaults to
  `sys.argv`. Exits with status 0, 2 (a user error, one line on stderr) or 75 (stopped by SIGTERM)."""
  preemption.install()   # first: from here on a SIGTERM is a stop request of the run, never lost
  cwd = os.getcwd()
  if cwd not in sys.path and '' not in sys.path:   # config files import modules of the current directory
    sys.path.append(cwd)
  from absl import app
  define_flags()
  app.run(run, argv=argv, flags_parser=parse_flags)


def run(argv: Sequence[str]) -> None:
  """What the command does once its flags are parsed (absl's `main`)."""
  del argv
  holders = define_flags()
  if holders.list.value:
    from incremental_jax import listing
    print(listing.listing())
    return
  from incremental_jax import backend_tuning
  backend_tuning.set_up()   # XLA:CPU flags in XLA_FLAGS before JAX is imported, so before its first computation
  import jax
  dist = distributed_args({k: getattr(holders, k).value for k in ('coordinator_address', 'num_processes',
                                                                   'process_id', 'distributed')})
  if dist is not None:
    # off: JAX's preemption service would install its own SIGTERM handler in place of ours, and a SIGTERM it took
    # would never stop the run (tests/test_preemption.py, case right_after_distributed_init)
    jax.config.update('jax_enable_preemption_service', False)
    jax.distributed.initialize(**dist)
  from incremental_jax import faults
  faults.reached('distributed_init')
  from absl import logging as absl_logging
  import incremental_jax
  from incremental_jax.errors import USER_ERRORS
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax reports every file it writes at INFO
  try:
    config = holders.config.value
    config.method  # noqa: B018 - config_flags reports a config file it could not load on first access
  except OSError as e:   # config_flags reports a config file it could not load here
    exit_with_error(f'--config: {" ".join(str(e).split())}')
  try:
    config = overridden(config, **{k: getattr(holders, k).value for k in SHORTHANDS})
    incremental_jax.train_and_evaluate(config, holders.workdir.value or default_workdir(config))
  except USER_ERRORS as e:
    exit_with_error(str(e))
  except preemption.Preempted as e:   # SIGTERM: checkpoint saved, exit status 75
    print(e, file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_CODE)
  except preemption.ProcessLost as e:   # another process died: exit status 75 now, not at JAX's shutdown barrier
    print(e, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(preemption.EXIT_CODE)


def exit_with_error(message: str) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def default_workdir(config) -> str:
  return os.path.join('runs', f'{config.method.name}_{config.data.name}')


def overridden(config, **shorthands):
  """`config` with the shorthand flags given (`compilation_cache=`, `sweep=`; None: not given) set on its fields of
  the same name, as a copy (field references kept); `config` itself when none is given. A field the config does
  not have is a `ConfigError` naming the flag."""
  from incremental_jax.errors import ConfigError
  given = {k: v for k, v in shorthands.items() if v is not None}
  for name in given:
    if name not in config:
      raise ConfigError(f'--{name}: the config has no field {name!r} (a config not built on '
                        'incremental_jax.config.base_config, or an older version of it).')
  if not given:
    return config
  config = copy.deepcopy(config)
  for name, value in given.items():
    config[name] = value
  return config


def distributed_args(values: dict, environ=os.environ) -> Optional[dict]:
  """The arguments of `jax.distributed.initialize`, or None for a single-process run: the flags' `values`
  (coordinator_address, num_processes, process_id, distributed) first, then the JAX_COORDINATOR_ADDRESS /
  JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables; `--distributed` alone leaves the unset ones to JAX's
  cluster detection."""
  def env_int(name):
    return int(environ[name]) if environ.get(name) else None
  args = {'coordinator_address': values.get('coordinator_address') or environ.get('JAX_COORDINATOR_ADDRESS') or None,
          'num_processes': (values['num_processes'] if values.get('num_processes') is not None
                            else env_int('JAX_NUM_PROCESSES')),
          'process_id': values['process_id'] if values.get('process_id') is not None else env_int('JAX_PROCESS_ID')}
  if values.get('distributed') or any(v is not None for v in args.values()):
    return args
  return None


def config_argument(value: str, cwd: Optional[str] = None) -> str:
  """`--config`'s value as config_flags loads it: `<name>[:<preset>]`, where no file or folder <name> exists in
  `cwd` (default: the current directory) and <name> is one of the package's preset modules (`lucir`), becomes that
  module's file (`.../incremental_jax/configs/lucir.py[:<preset>]`); a value naming a file is unchanged. A bare
  name (no folder, no `.py`) that is neither is a `ConfigError` listing the preset modules."""
  from incremental_jax import listing
  from incremental_jax.errors import ConfigError
  from incremental_jax.registry import unknown_name_message
  name, sep, preset = value.partition(':')
  if os.path.exists(os.path.join(cwd or os.getcwd(), name)):
    return value
  modules = listing.module_names(listing.package_configs_dir())
  if name in modules:
    return os.path.join(listing.package_configs_dir(), f'{name}.py') + sep + preset
  if name and os.sep not in name and '/' not in name and not name.endswith('.py'):
    raise ConfigError(unknown_name_message('--config', name, 'a config file or a preset module of the package',
                                           modules, ' (or a path to a config file: file.py:preset)'))
  return value


def resolved_argv(argv: Sequence[str]) -> list:
  """`argv` with the value of `--config` (`--config=V` or `--config V`) passed through `config_argument`."""
  out = list(argv[:1])
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith('--config='):
      out.append('--config=' + config_argument(arg[len('--config='):]))
    elif i > 1 and argv[i - 1] == '--config' and not arg.startswith('-'):
      out.append(config_argument(arg))
    else:
      out.append(arg)
  return out


def parse_flags(argv: Sequence[str]) -> list:
  """absl's flag parsing, with every mistake in the command line (an unknown preset, a misspelt or unknown
  config field, a value of the wrong type) reported as one line on stderr and exit status 2."""
  from absl import flags
  from incremental_jax.errors import ConfigError
  try:
    resolved = resolved_argv(argv)
  except ConfigError as e:
    exit_with_error(str(e))
  try:
    return flags.FLAGS(resolved)
  except Exception as e:  # noqa: BLE001 - any parsing failure is the user's command line
    exit_with_error(command_line_error(e, argv))


def command_line_error(error: Exception, argv: Sequence[str]) -> str:
  """One line for a command-line parsing failure: a missing config field names the flag that set it and the close
  matches; an error raised by a config file's `get_config` (an unknown preset) is its own message after the
  `--config` value the user gave, without config_flags' traceback."""
  from absl import flags
  chain = [error]
  while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  missing = [e for e in chain if isinstance(e, (AttributeError, KeyError))]
  cause = missing[0] if missing else chain[-1]
  if missing:
    text = next((e.args[0] for e in missing if e.args and isinstance(e.args[0], str)), str(cause))
    lines = [line.strip(' \'"') for line in str(text).splitlines()]
    field = lines[0]
    flag = next((a.split('=')[0] for a in argv if a.startswith('--config.') and field in a.split('=')[0].split('.')[1:]),
                '--config')
    return ' '.join([f'{flag}: the config has no field {field!r}.', *lines[1:]])
  if any('Error whilst parsing config file' in str(e) for e in chain) and str(cause):
    given = next((a for a in argv if a.startswith('--config=')), '--config')
    return ' '.join(f'{given}: {cause}'.split())
  return ' '.join(str(error if isinstance(error, flags.Error) or not str(cause) else cause).split())
