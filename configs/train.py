# The presets of incremental_jax/configs/train.py for the command line: --config=configs/train.py:<preset>.
from incremental_jax.configs.train import *  # noqa: F401,F403
from incremental_jax.configs.train import __doc__, get_config  # noqa: F401
