# The presets of incremental_jax/configs/m2kd.py for the command line: --config=configs/m2kd.py:<preset>.
from incremental_jax.configs.m2kd import *  # noqa: F401,F403
from incremental_jax.configs.m2kd import __doc__, get_config  # noqa: F401
