"""The start-up summary a run prints (process 0) before it trains: what data was found and how the protocol,
method and network are set up, in the numbering of results.json (`step t`, t = 0 the base task).

`startup_summary(...)` is a pure function of plain values and returns the text; `session_summary(specs, states,
...)` gathers those values from the runs' specs and states.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

MAX_ORDER = 10       # class-order entries shown
MAX_METHOD = 14      # method fields shown


def _flat(d: dict, prefix: str = '') -> list:
  """[(dotted key, value)] of a nested dict's leaves."""
  out = []
  for k, v in d.items():
    if isinstance(v, dict):
      out += _flat(v, f'{prefix}{k}.')
    else:
      out.append((f'{prefix}{k}', v))
  return out


def _numbers(values: Sequence[float]) -> str:
  return '(' + ', '.join(f'{float(v):.4f}' for v in values) + ')'


def protocol(task_sizes: Sequence[int]) -> str:
  """'base + increments', e.g. (2, 2, 2, 2, 2) -> '2 + 4×2', (50, 5, 5) -> '50 + 2×5', (4, 6) -> '4 + 6'."""
  base, rest = task_sizes[0], list(task_sizes[1:])
  if not rest:
    return str(base)
  if len(set(rest)) == 1 and len(rest) > 1:
    return f'{base} + {len(rest)}×{rest[0]}'
  return ' + '.join(str(s) for s in task_sizes)


def startup_summary(config: Any, workdir: str, *, dataset_name: str, location: str, num_classes: int,
                    num_train: int, num_test: int, image_shape: Sequence[int], mean: Sequence[float],
                    std: Sequence[float], class_order: Sequence[int], task_sizes: Sequence[int], num_params: int,
                    uses_memory: bool, num_devices: int, platform: str, num_processes: int, start_task: int = 0,
                    mid: Optional[dict] = None, num_runs: int = 1) -> str:
  """The summary's text. `config` is the run's config (read for the method, optimiser, memory and network);
  `class_order` the original class id at each position; `start_task` the first step still to train and `mid`
  the mid-task checkpoint's entry (`task`, `phase_name`, `epoch`) when the run resumes inside a step."""
  d, m, o, mem = config.data, config.model, config.optim, config.memory
  order = ', '.join(str(int(c)) for c in class_order[:MAX_ORDER]) + (', ...' if len(class_order) > MAX_ORDER else '')
  order_from = 'explicit data.class_order' if tuple(d.class_order) else f'seed {d.class_order_seed}'
  if num_runs > 1:
    order_from = (f'run 0 of {num_runs}, the same order in every run' if config.runs_vary == 'seed' else
                  f'run 0 of {num_runs}; run k: class order seed {d.class_order_seed} + k')
  n = len(task_sizes)
  method = [(k, v) for k, v in _flat(config.method.to_dict()) if k != 'name']
  method_text = ', '.join(f'{k}={v}' for k, v in method[:MAX_METHOD]) + (', ...' if len(method) > MAX_METHOD else '')
  schedule = str(o.schedule)
  if o.schedule == 'multistep':
    schedule += f' x{o.gamma} at epochs {tuple(o.milestones)}' if tuple(o.milestones) else ', no milestones'
  first = (f'; step 0: {o.first_task_epochs} epochs' if o.first_task_epochs else '') + \
      (f', lr {o.first_task_lr}' if o.first_task_lr else '')
  if uses_memory:
    budget = f'{mem.total} in total' if mem.total else f'{mem.per_class} per class'
    memory = f'{budget}, {mem.selection}'
  else:
    memory = 'none'
  if mid:
    resume = (f"resumes inside step {mid['task']} (phase {mid['phase_name']!r} after epoch {mid['epoch']}); "
              f'steps {mid["task"]}..{n - 1} to train')
  elif start_task >= n:
    resume = f'resumes a finished run (steps 0..{n - 1} done)'
  elif start_task:
    resume = f'resumes after step {start_task - 1}; steps {start_task}..{n - 1} to train'
  else:
    resume = f'new run; steps 0..{n - 1} to train'
  lines = [
      ('data set', f'{dataset_name}, read from {location or "(unknown)"}'),
      ('classes', f'{num_classes}; {num_train} train and {num_test} test images of shape '
                  + '×'.join(str(int(s)) for s in image_shape)),
      ('normalisation', f'mean {_numbers(mean)}, std {_numbers(std)} per channel on the [0, 1] scale'),
      ('class order', f'[{order}] ({order_from})'),
      ('tasks', f'{n} steps (0..{n - 1}): {protocol(list(task_sizes))} classes'),
      ('method', f'{config.method.name}' + (f': {method_text}' if method_text else '')),
      ('optimiser', f'{o.epochs} epochs, batch {o.batch_size}, lr {o.lr} ({schedule}), momentum {o.momentum}, '
                    f'weight decay {o.weight_decay}{first}'),
      ('memory', memory),
      ('network', f'{m.backbone}-{m.depth} width {m.width}, {m.head} head, {m.dtype}; {num_params:,} parameters'),
      ('devices', f'{num_devices} {platform} device(s), {num_processes} process(es)'),
      ('workdir', f'{workdir} ({resume})'
                  + (f'; {num_runs} runs in run_0..run_{num_runs - 1}' if num_runs > 1 else '')),
  ]
  width = max(len(k) for k, _ in lines)
  return 'run set-up:\n' + '\n'.join(f'  {k:<{width}}  {v}' for k, v in lines)


def session_summary(specs: Sequence[Any], states: Sequence[Any], workdir: str, config: Any) -> str:
  """`startup_summary` of the runs of the task loop (`run_spec.RunSpec` and restored `run_state.RunState` each),
  one run (a list of one) or a `num_runs` group (`workdir` and `config` are the group's; the data, network and
  class order shown are run 0's)."""
  import jax
  lead = specs[0]
  ds, scenario = lead.data.dataset, lead.scenario
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(states[0].train.params))
  in_task = states[0].cursor.in_task
  mid = ({'task': states[0].cursor.task, 'phase_name': in_task.phase_name, 'epoch': in_task.epoch}
         if in_task is not None and len(states) == 1 else None)
  return startup_summary(
      config, workdir, dataset_name=ds.name, location=ds.location, num_classes=ds.num_classes,
      num_train=len(ds.train_labels), num_test=len(ds.test_labels), image_shape=ds.image_shape, mean=ds.mean,
      std=ds.std, class_order=scenario.order.tolist(), task_sizes=scenario.sizes, num_params=num_params,
      uses_memory=lead.method.uses_memory, num_devices=jax.device_count(), platform=jax.devices()[0].platform,
      num_processes=jax.process_count(), start_task=min(s.cursor.task for s in states), mid=mid,
      num_runs=len(states))
