"""The state of a run as a value: what a run carries from one stage to the next, and all that a checkpoint holds.

A stage takes the state (and the run's fixed `RunSpec`) and returns a new one; nothing changes a state in place
(frozen dataclasses, tuples). `store.RunStore.save(state)` writes it, `RunStore.restore` reads it back, and a
resumed run continues from the state as it was saved.

- `RunState.train/frozen/method_state/memory` are the run's networks and memory at the start of task
  `cursor.task` (the end of the task before; the initial ones before task 0).
- `RunState.records` are the finished tasks' results (results.json's `steps`, one per task).
- `RunState.cursor.in_task`, when not None, says how far task `cursor.task` went (a mid-task checkpoint): the
  train state after the epochs done, the losses so far, and the memory once this task updated it. A resumed task
  runs its hooks again from the task-start state (they are deterministic) and skips what `in_task` covers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from incremental_jax.memory import Memory
from incremental_jax.types import TrainState

MAIN, BALANCING, AFTER = 'main', 'balancing', 'after'   # the stages of a task, in order (`InTask.stage`)


@dataclasses.dataclass(frozen=True)
class InTask:
  """How far a task went: `epoch` epochs of phase number `phase` (named `phase_name`) of `stage` ('main': the
  method's phases; 'balancing': its phases after the memory update; 'after': every phase done, before the
  `after_task` hook), leaving `train`.

  `losses`: ((phase name, per-epoch losses), ...) of the task's finished phases; `phase_losses`: the current
  phase's per-epoch losses so far. `memory`: the memory after this task's update (stages after it), else None."""
  stage: str
  phase: int
  phase_name: str
  epoch: int
  train: TrainState
  losses: tuple = ()
  phase_losses: tuple = ()
  memory: Optional[Memory] = None


@dataclasses.dataclass(frozen=True)
class Cursor:
  """Where a run is: the next task to train, the global train step of the task-end checkpoint it starts from
  (None before the first), and how far that task went (`InTask`, None at its start)."""
  task: int = 0
  task_start_step: Optional[int] = None
  in_task: Optional[InTask] = None


@dataclasses.dataclass(frozen=True)
class RunState:
  """Everything a run carries between stages (module docstring)."""
  train: TrainState
  frozen: Any
  method_state: dict
  memory: Memory
  records: tuple = ()
  cursor: Cursor = Cursor()

  def replace(self, **changes) -> 'RunState':
    return dataclasses.replace(self, **changes)
