"""incremental_jax: class-incremental learning and knowledge distillation in JAX/Flax.

    from configs import lucir
    import incremental_jax
    results = incremental_jax.train_and_evaluate(lucir.get_config('digits'), workdir='runs/lucir_digits')
"""
from incremental_jax import xla_cpu

xla_cpu.configure()   # XLA:CPU flags, before any computation starts XLA (see incremental_jax/xla_cpu.py)

from incremental_jax.run import train_and_evaluate  # noqa: E402

__all__ = ['train_and_evaluate']
__version__ = '0.1.0'
