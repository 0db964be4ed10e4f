"""Command-line entry point: `python main.py --config=configs/lucir.py:digits --workdir=runs/lucir_digits`.

Every config field can be overridden, e.g. `--config.optim.lr=0.05 --config.data.data_dir=/data`. Running
again with the same --workdir resumes from the last complete checkpoint.

Several processes (one per host on a GPU cluster or TPU pod, or CPU processes on one machine) join through
JAX's distributed runtime: with --coordinator_address/--num_processes/--process_id (or the environment
variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or with --distributed, which lets
`jax.distributed.initialize()` detect the cluster (SLURM, Open MPI, Cloud TPU pods, Kubernetes). Every
process runs the same command; process 0 writes the results.

An invalid config, data set or workdir stops the run before training with one line on stderr and exit code 2.
SIGTERM (a preemption notice) makes the run checkpoint at its next epoch boundary, print one line on stderr and
exit with code 75 (`incremental_jax.preemption`); the same command resumes it.
"""
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, optionally with a preset: file.py:preset.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and results (resumed if it exists).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process runs).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process runs).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process (multi-process runs).')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() and let JAX detect the '
                                 'cluster (SLURM, Open MPI, Cloud TPU pod, Kubernetes); implied by the flags above.')
_CACHE = flags.DEFINE_string(
    'compilation_cache', None,
    'Shorthand for --config.compilation_cache: the persistent XLA compilation cache directory (default '
    '~/.cache/incremental_jax/xla; re-runs and resumes skip compilation); empty disables it. '
    'JAX_COMPILATION_CACHE_DIR, when set, takes precedence.')
_LIST = flags.DEFINE_bool('list', False, 'Print every method and every preset of configs/*.py, then exit.')
flags.register_multi_flags_validator(['config', 'list'], lambda f: f['config'] is not None or f['list'],
                                     '--config is required (or --list).')


def default_workdir(config) -> str:
  return os.path.join('runs', f'{config.method.name}_{config.data.name}')


def distributed_args(environ=os.environ) -> dict | None:
  """The arguments of `jax.distributed.initialize`, or None for a single-process run: flags first, then the
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables; `--distributed` alone
  leaves the unset ones to JAX's cluster detection."""
  def env_int(name):
    return int(environ[name]) if environ.get(name) else None
  args = {'coordinator_address': _COORDINATOR.value or environ.get('JAX_COORDINATOR_ADDRESS') or None,
          'num_processes': _NUM_PROCESSES.value if _NUM_PROCESSES.value is not None else env_int('JAX_NUM_PROCESSES'),
          'process_id': _PROCESS_ID.value if _PROCESS_ID.value is not None else env_int('JAX_PROCESS_ID')}
  if _DISTRIBUTED.value or any(v is not None for v in args.values()):
    return args
  return None


def main(argv):
  del argv
  if _LIST.value:
    from incremental_jax import listing
    print(listing.listing(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')))
    return
  from incremental_jax import backend_tuning
  backend_tuning.set_up()   # XLA:CPU flags in XLA_FLAGS before JAX is imported, so before its first computation
  import jax
  dist = distributed_args()
  if dist is not None:
    jax.distributed.initialize(**dist)
  import incremental_jax
  from incremental_jax import preemption
  from incremental_jax.errors import USER_ERRORS
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax reports every file it writes at INFO
  try:
    config = _CONFIG.value
    config.method  # noqa: B018 - config_flags reports a config file it could not load on first access
  except OSError as e:   # config_flags reports a config file it could not load here
    print(f'error: --config: {" ".join(str(e).split())}', file=sys.stderr, flush=True)
    sys.exit(2)
  if _CACHE.value is not None:
    config.compilation_cache = _CACHE.value
  workdir = _WORKDIR.value or default_workdir(config)
  preemption.install()   # after jax.distributed.initialize: replaces the SIGTERM handler of JAX's preemption service
  try:
    incremental_jax.train_and_evaluate(config, workdir)
  except USER_ERRORS as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
  except preemption.Preempted as e:   # SIGTERM: checkpoint saved, exit code 75
    print(e, file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_CODE)
  except preemption.ProcessLost as e:   # another process died: exit code 75 now, not at JAX's shutdown barrier
    print(e, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(preemption.EXIT_CODE)


def parse_flags(argv: list) -> list:
  """absl's flag parsing, with every mistake in the command line (an unknown preset, a misspelt or unknown
  config field, a value of the wrong type) reported as one line on stderr and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - any parsing failure is the user's command line
    print(f'error: {command_line_error(e, argv)}', file=sys.stderr, flush=True)
    sys.exit(2)


def command_line_error(error: Exception, argv: list) -> str:
  """One line for a command-line parsing failure; a missing config field names the flag that set it and the
  close matches."""
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
  return ' '.join(str(error if isinstance(error, flags.Error) or not str(cause) else cause).split())


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
