"""Command-line entry point: `python main.py --config=configs/lucir.py:digits --workdir=runs/lucir_digits`.

The same command as `incremental-jax` (the console script of the installed package) and
`python -m incremental_jax`: flags, exit statuses and `--list` are `incremental_jax.cli`'s (its docstring
describes them).
"""
from incremental_jax import cli

if __name__ == '__main__':
  cli.main()
