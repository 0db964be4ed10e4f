"""Every error a user can cause (a bad config, data set, scenario or workdir). A leaf module: it imports
nothing of the package, so every floor can raise these.

The command line (`incremental_jax.cli`) prints the message of any `USER_ERRORS` member alone, on one line of
stderr, and exits with status 2.
"""
from __future__ import annotations


class ConfigError(ValueError):
  """An invalid config value; the message names the field and the valid choices."""


class UnknownName(ConfigError):
  """A name that is not in its table (a method, backbone, data set, preset, ...); the message names the config
  field, the valid names and the close matches (`incremental_jax.registry.Registry.lookup`)."""


class DataError(ValueError):
  """A data set is missing, unreadable or inconsistent; the message says what was looked for and how to fix it."""


class ScenarioError(ValueError):
  """A class-incremental split that the data set cannot support (too few classes, a bad class order)."""


class CheckpointError(RuntimeError):
  """A checkpoint directory that cannot be resumed (corrupt, foreign, or from a different config)."""


class ReportError(ValueError):
  """A comparison report that cannot be made (a directory without results, runs of different protocols)."""


# FloatingPointError is a diverged run (a non-finite loss), reported with its global step.
USER_ERRORS = (ConfigError, DataError, ScenarioError, CheckpointError, ReportError, FloatingPointError)
