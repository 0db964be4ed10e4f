# The presets of incremental_jax/configs/iekd.py for the command line: --config=configs/iekd.py:<preset>.
from incremental_jax.configs.iekd import *  # noqa: F401,F403
from incremental_jax.configs.iekd import __doc__, get_config  # noqa: F401
