# The presets of incremental_jax/configs/icarl.py for the command line: --config=configs/icarl.py:<preset>.
from incremental_jax.configs.icarl import *  # noqa: F401,F403
from incremental_jax.configs.icarl import __doc__, get_config  # noqa: F401
