# The presets of incremental_jax/configs/finetune.py for the command line: --config=configs/finetune.py:<preset>.
from incremental_jax.configs.finetune import *  # noqa: F401,F403
from incremental_jax.configs.finetune import __doc__, get_config  # noqa: F401
