"""Command-line entry point: `python main.py --config=configs/lucir.py:digits --workdir=runs/lucir_digits`.

Every config field can be overridden, e.g. `--config.optim.lr=0.05 --config.data.data_dir=/data`. Running
again with the same --workdir resumes after the last completed task. Several processes (multi-host GPU/TPU,
or CPU processes) join through JAX's distributed runtime when launched with its usual environment variables
or with --coordinator_address/--num_processes/--process_id.
"""
import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, optionally with a preset: file.py:preset.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and results (resumed if it exists).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process runs).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process runs).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process (multi-process runs).')
_CACHE = flags.DEFINE_string(
    'compilation_cache', os.path.join(os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')),
                                      'incremental_jax', 'xla'),
    'Persistent XLA compilation cache (re-runs and resumes skip compilation); empty disables it. '
    'JAX_COMPILATION_CACHE_DIR, when set, takes precedence.')
flags.mark_flags_as_required(['config'])


def default_workdir(config) -> str:
  return os.path.join('runs', f'{config.method.name}_{config.data.name}')


def main(argv):
  del argv
  import jax
  if _CACHE.value and not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    jax.config.update('jax_compilation_cache_dir', _CACHE.value)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  if _COORDINATOR.value or _NUM_PROCESSES.value or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  import incremental_jax
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax reports every file it writes at INFO
  config = _CONFIG.value
  workdir = _WORKDIR.value or default_workdir(config)
  incremental_jax.train_and_evaluate(config, workdir)


if __name__ == '__main__':
  app.run(main)
