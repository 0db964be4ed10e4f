# The presets of incremental_jax/configs/bake.py for the command line: --config=configs/bake.py:<preset>.
from incremental_jax.configs.bake import *  # noqa: F401,F403
from incremental_jax.configs.bake import __doc__, get_config  # noqa: F401
