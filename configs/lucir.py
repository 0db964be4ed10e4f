# The presets of incremental_jax/configs/lucir.py for the command line: --config=configs/lucir.py:<preset>.
from incremental_jax.configs.lucir import *  # noqa: F401,F403
from incremental_jax.configs.lucir import __doc__, get_config  # noqa: F401
