# The presets of incremental_jax/configs/joint.py for the command line: --config=configs/joint.py:<preset>.
from incremental_jax.configs.joint import *  # noqa: F401,F403
from incremental_jax.configs.joint import __doc__, get_config  # noqa: F401
