"""Deterministic fault injection, for testing that a run survives being killed at any point.

    INCREMENTAL_JAX_FAULT=<point>:<n>[:term][,<point>:<n>[:term]...] python main.py ...

kills the process with SIGKILL (no cleanup, no `finally`, like an out-of-memory kill or a lost machine) the
n-th time (1-based, counted from the start of the process) that the named point is reached; with `:term` it
sends SIGTERM instead (a preemption notice, see `incremental_jax.preemption`). Points:

  distributed_init    right after the command line has joined the distributed runtime (`jax.distributed.initialize`;
                      in a one-process run, where it would have), before it reads the config
  train_step          after a train step has been dispatched (inside a task's training)
  epoch_end           after an epoch's metrics are read back (before any mid-task checkpoint)
  checkpoint_write    right after a checkpoint has started being written (Orbax writes in the background)
  exemplar_selection  before the exemplars of one class are selected (herding)
  task_end            after a task's checkpoint has started being written (in the background) and the results
                      of the task before it are written

Without the variable every call returns at once; the train loop asks `armed('train_step')` once per phase and
skips the call per step, so injection costs nothing in normal runs.

    INCREMENTAL_JAX_PERTURB=<decision>[,<decision>...]

makes `perturbed(decision, value)` return a different value in this process: a host-computed decision that
every process must agree on (see `parallel.agree`) computed differently on one host, as a different BLAS or
library version could. Decisions: herding (exemplar indices), podnet_imprint (k-means imprinted weights),
lucir_imprint (LUCIR's imprinted weights), prune_masks (M2KD's pruning masks), epoch_plan (the sampler's
batches), on_device (whether the images fit the device under data.on_device='auto').
"""
from __future__ import annotations

import collections
import os
import signal

ENV_VAR = 'INCREMENTAL_JAX_FAULT'
POINTS = ('distributed_init', 'train_step', 'epoch_end', 'checkpoint_write', 'exemplar_selection', 'task_end')
SIGNALS = {'kill': signal.SIGKILL, 'term': signal.SIGTERM}
PERTURB_VAR = 'INCREMENTAL_JAX_PERTURB'
# the host decisions `parallel` checks or broadcasts across processes -> what each is, for messages
DECISIONS = {'herding': 'the herding exemplar indices', 'podnet_imprint': "PODNet's k-means imprinted proxies",
             'lucir_imprint': "LUCIR's imprinted class weights", 'prune_masks': "M2KD's pruning mask",
             'epoch_plan': "the sampler's epoch plan",
             'on_device': "the images' placement (data.on_device='auto': whether they fit the device)"}

_plan: dict[str, tuple[int, int]] = {}   # point -> (occurrence, signal)
_perturb: frozenset = frozenset()
_counts: collections.Counter = collections.Counter()


def parse_signals(spec: str) -> dict[str, tuple[int, int]]:
  """'point:n[:term],...' -> {point: (n, signal)}; raises ValueError naming the valid points."""
  plan = {}
  for item in filter(None, (s.strip() for s in (spec or '').split(','))):
    point, n, *action = item.split(':') + ([''] if ':' not in item else [])
    if (point not in POINTS or not n.isdigit() or int(n) < 1 or len(action) > 1
        or (action and action[0] not in SIGNALS)):
      raise ValueError(f'{ENV_VAR}={spec!r}: expected <point>:<n>[:term] with n >= 1 and point one of '
                       f'{list(POINTS)}.')
    plan[point] = (int(n), SIGNALS[action[0] if action else 'kill'])
  return plan


def parse(spec: str) -> dict[str, int]:
  """'point:n,point:n' -> {point: n}; raises ValueError naming the valid points."""
  return {point: n for point, (n, _) in parse_signals(spec).items()}


def parse_perturb(spec: str) -> frozenset:
  names = frozenset(filter(None, (s.strip() for s in (spec or '').split(','))))
  if names - set(DECISIONS):
    raise ValueError(f'{PERTURB_VAR}={spec!r}: decisions are {list(DECISIONS)}.')
  return names


def configure(spec: str | None = None, perturb: str | None = None) -> None:
  """(Re)reads the plan from `spec` and the perturbed decisions from `perturb` (default: the environment
  variables) and resets the counters."""
  global _plan, _perturb
  _plan = parse_signals(os.environ.get(ENV_VAR, '') if spec is None else spec)
  _perturb = parse_perturb(os.environ.get(PERTURB_VAR, '') if perturb is None else perturb)
  _counts.clear()


def armed(point: str) -> bool:
  return point in _plan


def reached(point: str) -> None:
  """Counts one occurrence of `point`; SIGKILLs (or SIGTERMs) this process at the planned occurrence."""
  if point not in _plan:
    return
  _counts[point] += 1
  n, sig = _plan[point]
  if _counts[point] == n:
    os.kill(os.getpid(), sig)


def perturbed(decision: str, value):
  """`value`, or when this process perturbs `decision`, a different array of the same shape and dtype: integer
  arrays rolled by one position (indices in another order), float arrays plus 1e-3."""
  if decision not in _perturb:
    return value
  import numpy as np
  value = np.asarray(value)
  if np.issubdtype(value.dtype, np.integer) or value.dtype == bool:
    return np.roll(value, 1)
  return value + np.asarray(1e-3, value.dtype)


configure()
