"""Preemption: SIGTERM (what preemptible VMs, Cloud TPU maintenance events and SLURM send before they kill a job)
makes the run save a checkpoint at its next epoch boundary and stop, on every process together.

`install()` makes SIGTERM set a flag of this process. The command line (`incremental_jax.cli`) calls it first,
before it imports anything heavy, parses flags or joins the distributed runtime, so that no SIGTERM is lost from
the start of the process: one received before the run starts stops it at its first boundary. The run asks
`requested()` at each epoch end of every training loop and after each task, on every process.

- One process: `requested()` is the flag.
- Several processes (`jax.distributed`): `requested()` gathers every process's flag
  (`multihost_utils.process_allgather`, one small collective per boundary) and answers True everywhere when any
  process has it, so all stop at the same boundary. JAX's own preemption service is not used: its sync point is
  the largest id any process passed to `reached_preemption_sync_point` plus one, and Orbax passes the train step
  there on every save, so a counter of boundaries would never reach it after the first save. The command line
  turns that service off (`jax_enable_preemption_service`) before `jax.distributed.initialize`, whose service
  would otherwise register its own SIGTERM handler in place of this one and swallow a SIGTERM (Orbax treats a
  disabled service as no preemption).

Once `requested()` has said True it keeps saying so (a boundary where no checkpoint can be written, e.g. after
a phase's last epoch, passes the stop on to the next one) until `reset()`, which `train_and_evaluate` calls when
it starts (a notebook's next run after a `Preempted`). The run raises `Preempted` after its checkpoint is
complete; the command line prints its one-line message (where it stopped, how to resume) and exits with
`EXIT_CODE`.
Running the same command again resumes from that checkpoint to the results of an uninterrupted run.
"""
from __future__ import annotations

import signal

EXIT_CODE = 75   # EX_TEMPFAIL (sysexits.h): stopped on purpose, run the same command again to continue


class Preempted(Exception):
  """The run stopped after a preemption notice; its message says where and how to resume."""


class StopRequested(Exception):
  """Raised where a stop request was honoured (an epoch end of any training loop, a task end); the message says
  where. The run waits for the checkpoints it saved and raises `Preempted`."""


class _State:
  signalled = False   # SIGTERM seen by this process's handler
  stop = False        # the answer given once, kept until reset()


_state = _State()


def _on_sigterm(signum, frame) -> None:
  del signum, frame
  _state.signalled = True


def install() -> None:
  """Makes SIGTERM a stop request of this process (a SIGTERM already recorded is kept). Imports nothing, so an
  entry point can call it first. `jax.distributed.initialize` with JAX's preemption service on registers its own
  SIGTERM handler in place of this one: turn the service off first (`jax_enable_preemption_service`), as
  `incremental_jax.cli` does."""
  signal.signal(signal.SIGTERM, _on_sigterm)


def _any_process(flag: bool) -> bool:
  """Whether `flag` is True on any process: the same answer on every process (a collective with several
  processes, so every process must call it at the same point)."""
  import jax
  if jax.process_count() == 1:
    return bool(flag)
  import numpy as np
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def requested() -> bool:
  """Whether the run must checkpoint and stop at this boundary: True once any process has received SIGTERM,
  the same answer on every process, kept until `reset()`. Call it at the same points on every process."""
  if not _state.stop:
    _state.stop = _any_process(_state.signalled)
  return _state.stop


def reset() -> None:
  """Starts a run afresh (`train_and_evaluate` calls it first): forgets a stop already answered and the SIGTERM
  behind it, so a notebook's next run after a `Preempted` trains; a SIGTERM not answered yet (one received
  between `install()` and the run's start) is kept."""
  if _state.stop:
    _state.signalled = False
  _state.stop = False


def message(workdir: str, where: str, step: int) -> str:
  """The one line printed when the run stops."""
  if step is None:
    return (f'preempted (SIGTERM): stopped {where} before any checkpoint of {workdir}; run the same command again '
            'to start it over.')
  return (f'preempted (SIGTERM): stopped {where} after saving checkpoint {step} in {workdir}; run the same command '
          f'again to resume from it.')
