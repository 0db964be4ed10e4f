"""incremental_jax: class-incremental learning and knowledge distillation in JAX/Flax.

    from incremental_jax.configs import lucir
    import incremental_jax
    results = incremental_jax.train_and_evaluate(lucir.get_config('digits'), workdir='runs/lucir_digits')

A method of your own (a `incremental_jax.methods.Method` subclass) runs the same way once registered:
`incremental_jax.register_method('my_method', MyMethod)`, with `config.method.name = 'my_method'`.

Importing a sub-module (`incremental_jax.losses`, `incremental_jax.models`) loads only what it needs; the run
machinery is imported on first use of `train_and_evaluate` or `register_method`. Importing the package changes no
environment variable, starts no process and writes no file: `train_and_evaluate` sets the backend up
(`backend_tuning.set_up`: XLA:CPU flags that take effect only before JAX's first computation; call it first in a
notebook that computes with JAX before training).
"""

__all__ = ['train_and_evaluate', 'register_method']
__version__ = '0.1.0'


def __getattr__(name):
  if name == 'train_and_evaluate':
    from incremental_jax.run import train_and_evaluate
    return train_and_evaluate
  if name == 'register_method':
    from incremental_jax.methods import register_method
    return register_method
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
