"""Deterministic fault injection, for testing that a run survives being killed at any point.

    INCREMENTAL_JAX_FAULT=<point>:<n>[,<point>:<n>...] python main.py ...

kills the process with SIGKILL (no cleanup, no `finally`, like an out-of-memory kill or a lost machine) the
n-th time (1-based, counted from the start of the process) that the named point is reached. Points:

  train_step          after a train step has been dispatched (inside a task's training)
  epoch_end           after an epoch's metrics are read back (before any mid-task checkpoint)
  checkpoint_write    right after a checkpoint has started being written (Orbax writes in the background)
  exemplar_selection  before the exemplars of one class are selected (herding)
  task_end            after a task's checkpoint is complete and results.json is written

Without the variable every call returns at once; the train loop asks `armed('train_step')` once per phase and
skips the call per step, so injection costs nothing in normal runs.
"""
from __future__ import annotations

import collections
import os
import signal

ENV_VAR = 'INCREMENTAL_JAX_FAULT'
POINTS = ('train_step', 'epoch_end', 'checkpoint_write', 'exemplar_selection', 'task_end')

_plan: dict[str, int] = {}
_counts: collections.Counter = collections.Counter()


def parse(spec: str) -> dict[str, int]:
  """'point:n,point:n' -> {point: n}; raises ValueError naming the valid points."""
  plan = {}
  for item in filter(None, (s.strip() for s in (spec or '').split(','))):
    point, _, n = item.partition(':')
    if point not in POINTS or not n.isdigit() or int(n) < 1:
      raise ValueError(f'{ENV_VAR}={spec!r}: expected <point>:<n> with n >= 1 and point one of {list(POINTS)}.')
    plan[point] = int(n)
  return plan


def configure(spec: str | None = None) -> None:
  """(Re)reads the plan from `spec` (default: the environment variable) and resets the counters."""
  global _plan
  _plan = parse(os.environ.get(ENV_VAR, '') if spec is None else spec)
  _counts.clear()


def armed(point: str) -> bool:
  return point in _plan


def reached(point: str) -> None:
  """Counts one occurrence of `point`; SIGKILLs this process at the planned occurrence."""
  if point not in _plan:
    return
  _counts[point] += 1
  if _counts[point] == _plan[point]:
    os.kill(os.getpid(), signal.SIGKILL)


configure()
