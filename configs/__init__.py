"""The command-line config files (`python main.py --config=configs/<name>.py:<preset>`): each re-exports the
presets of `incremental_jax.configs.<name>`, which is what a notebook imports."""
