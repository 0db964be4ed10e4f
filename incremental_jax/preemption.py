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

A process that dies without notice (SIGKILL, a lost host) cannot be waited for: the next collective of every other
process fails (Gloo on CPU: `Connection reset by peer`). `lost_process` recognises that error; the run raises
`ProcessLost`, whose one line names the lost process and the last checkpoint complete in storage (a save still in
flight needs the dead process to finish, and is never read); `main.py` prints it and leaves with `EXIT_CODE` at
once, skipping JAX's shutdown barrier, which would wait for the dead process until its heartbeat times out
(100 s) and then abort. The same command on every process resumes from that checkpoint.
"""
from __future__ import annotations

import re
import signal
from typing import Optional

EXIT_CODE = 75   # EX_TEMPFAIL (sysexits.h): stopped on purpose, run the same command again to continue


class Preempted(Exception):
  """The run stopped after a preemption notice; its message says where and how to resume."""


class ProcessLost(Exception):
  """Another process of the run is gone (killed, its host lost): its collectives cannot complete. The message says
  which and the checkpoint the same command resumes from; leave the interpreter with `os._exit(EXIT_CODE)`, as
  `main.py` does: a normal exit waits at JAX's shutdown barrier for the dead process, then aborts."""


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


# What a collective's error says when its peer went away: Gloo's (the CPU collectives; `Gloo all-reduce failed:`,
# `Gloo AllGather failed:`, raised as a JaxRuntimeError or a ValueError), or the runtime's on a closed connection.
# Other errors (out of memory, a bug, a bucket's connection) are no reason to requeue.
_GLOO_FAILED = re.compile(r'\bGloo \S+ failed\b')
_PEER_CLOSED = re.compile(r'Connection (reset|closed) by peer')
_SOURCE = re.compile(r'\[[^\]]*\.cc:\d+\] ')   # Gloo's `[external/gloo/.../pair.cc:538] ` before the cause


def lost_process(error: BaseException) -> Optional[str]:
  """Which process `error` says is gone ('process 1'; with more than two processes, the peer's address that Gloo
  names), when it is a failed collective whose peer went away in a multi-process run; None otherwise."""
  import jax   # imported where used: `install()` runs before JAX is imported
  if jax.process_count() == 1 or not isinstance(error, Exception):
    return None
  text = str(error).split('\n')[0]
  if not (_GLOO_FAILED.search(text) or
          (isinstance(error, jax.errors.JaxRuntimeError) and _PEER_CLOSED.search(text))):
    return None
  if jax.process_count() == 2:
    return f'process {1 - jax.process_index()}'
  peer = re.search(r'\[([0-9a-fA-F.:]+)\]:(\d+)', text)
  return f'a process (the peer at {peer.group(1)}:{peer.group(2)})' if peer else 'a process'


def lost_message(lost: str, error: BaseException, workdir: str, step: Optional[int]) -> str:
  """The one line printed when process `lost` is gone: the collective's error, and the last complete checkpoint
  `step` of `workdir` (None: none yet)."""
  cause = _SOURCE.sub('', str(error).split('\n')[0]).removeprefix('UNKNOWN: ')
  if step is None:
    return (f'lost {lost} ({cause}); no checkpoint of {workdir} is complete: run the same command again on every '
            'process to start it over.')
  return (f'lost {lost} ({cause}); the last complete checkpoint is {step} in {workdir}: run the same command again '
          'on every process to resume from it.')
