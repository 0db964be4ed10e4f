"""incremental_jax: class-incremental learning and knowledge distillation in JAX/Flax.

    from configs import lucir
    import incremental_jax
    results = incremental_jax.train_and_evaluate(lucir.get_config('digits'), workdir='runs/lucir_digits')
"""
from incremental_jax.run import train_and_evaluate

__all__ = ['train_and_evaluate']
__version__ = '0.1.0'
