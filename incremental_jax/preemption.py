"""Preemption: SIGTERM (what preemptible VMs, Cloud TPU maintenance events and SLURM send before they kill a job)
makes the run save a checkpoint at its next epoch boundary and stop, on every process together.

- One process: `install()` (called by `main.py`) turns SIGTERM into a request; the run asks `requested()` at each
  epoch end of a task's main phases and after each task.
- Several processes (`jax.distributed`): JAX's preemption service receives the SIGTERM of any process, and
  `jax.experimental.multihost_utils.reached_preemption_sync_point` answers True on every process at the same
  call, the first one after every process has heard of it; `requested()` makes that call (one per boundary, so the
  call counts agree because every process runs the same loop). `install()` then leaves SIGTERM to JAX.

Once `requested()` has said True it keeps saying so (a boundary where no checkpoint can be written, e.g. after
a phase's last epoch, passes the stop on to the next one). The run raises `Preempted` after its checkpoint is
complete; `main.py` prints its one-line message (where it stopped, how to resume) and exits with `EXIT_CODE`.
Running the same command again resumes from that checkpoint to the results of an uninterrupted run.
"""
from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils

EXIT_CODE = 75   # EX_TEMPFAIL (sysexits.h): stopped on purpose, run the same command again to continue


class Preempted(Exception):
  """The run stopped after a preemption notice; its message says where and how to resume."""


class StopRequested(Exception):
  """Raised by a loop below the run (a sub-network's training) that honoured a stop request at an epoch end; the
  message says where. The run saves what can be resumed and raises `Preempted`."""


class _State:
  requested = False   # SIGTERM seen by this process's handler (single process)
  stop = False        # the answer given once, kept
  calls = 0           # boundaries asked about so far (the sync-point id, equal on every process)


_state = _State()


def _on_sigterm(signum, frame) -> None:
  del signum, frame
  _state.requested = True


def install() -> None:
  """Makes SIGTERM a stop request of this (single) process; with several processes JAX's preemption service
  already listens for it and is left in charge."""
  if jax.process_count() == 1:
    signal.signal(signal.SIGTERM, _on_sigterm)


def requested() -> bool:
  """Whether the run must checkpoint and stop at this boundary: the same answer on every process. Call it at
  the same points on every process (each call is one sync-point id)."""
  _state.calls += 1
  if not _state.stop:
    if jax.process_count() > 1:
      _state.stop = bool(multihost_utils.reached_preemption_sync_point(_state.calls))
    else:
      _state.stop = _state.requested
  return _state.stop


def reset() -> None:
  """Forgets any request (tests; a notebook that goes on after a `Preempted`)."""
  _state.requested = _state.stop = False
  _state.calls = 0


def message(workdir: str, where: str, step: int) -> str:
  """The one line printed when the run stops."""
  return (f'preempted (SIGTERM): stopped {where} after saving checkpoint {step} in {workdir}; run the same command '
          f'again to resume from it.')
