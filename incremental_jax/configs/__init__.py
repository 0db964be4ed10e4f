"""The config presets of every method, importable wherever the package is installed (a notebook, a script in
any directory):

    from incremental_jax.configs import lucir
    config = lucir.get_config('digits')        # a preset by name; get_config() gives the module's default

Each module has `get_config(arg=None)` and its presets (`PRESETS`, or the shared protocols of
`incremental_jax.config.COMMON_PRESETS`); its docstring says what the presets follow. A method's own fields are
declared once, with their defaults, in its module's `method` section; the fields every run reads are in
`incremental_jax/config.py` (`base_config`). The repository's `configs/<name>.py` are the same presets for the
command line: `python main.py --config=configs/lucir.py:digits`.
"""
