"""`python -m incremental_jax ...`: the command line of `incremental_jax.cli` (the same as `incremental-jax`)."""
from incremental_jax import cli

if __name__ == '__main__':
  cli.main()
