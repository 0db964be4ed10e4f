# The presets of incremental_jax/configs/lwf.py for the command line: --config=configs/lwf.py:<preset>.
from incremental_jax.configs.lwf import *  # noqa: F401,F403
from incremental_jax.configs.lwf import __doc__, get_config  # noqa: F401
