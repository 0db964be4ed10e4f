# The presets of incremental_jax/configs/podnet.py for the command line: --config=configs/podnet.py:<preset>.
from incremental_jax.configs.podnet import *  # noqa: F401,F403
from incremental_jax.configs.podnet import __doc__, get_config  # noqa: F401
