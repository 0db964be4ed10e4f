"""Where a data-parallel run leaves the one-device run: per train step, the loss and its terms (and with --params
the parameters) of one preset run (a) on 1 process with 1 device, (b) on 1 process with N simulated devices,
(c) on N processes (jax.distributed on localhost, one CPU device each), and the host decisions (imprinted
kernels, herding exemplars) of each.

    python benchmarks/host_divergence.py --config=configs/lucir.py:test [--devices=2] [--params] [--relu]
        [--set=method.mr_weight=0.0] [--modes=one_device,devices,processes] [--out=/tmp/host_divergence]

Prints, against run (a): the results; per task and phase, the largest relative difference of the loss and of
each term; the first step whose loss differs by more than --threshold; how the imprinted kernels and exemplar
sets compare; with --params, the distance between the parameters after each step and its largest one-step
growth (a discrete event: a ReLU input or a hinge within rounding of its kink); with --relu, the smallest |input|
of each ReLU call of that step. The records are kept in --out/<mode>.json (and <mode>_params.npy).

The train step is recorded by wrapping `train.Trainer._compiled` (each step's metrics and parameters are read
back after it ran), which changes no number. --relu records the ReLU inputs with `jax.debug.callback`, which
changes XLA's fusions and so the rounding: its runs are other draws than those without it.
Measured figures: README, "Multi-process and multi-host runs".
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_KEYS = ('solo', 'chunk')


def load_config(config_arg: str, overrides: list):
  """The config of `configs/<method>.py:<preset>` with `key=value` overrides (numbers, strings, booleans)."""
  import importlib
  path, _, preset = config_arg.partition(':')
  config = importlib.import_module(path[:-len('.py')].replace('/', '.')).get_config(preset or None)
  for item in overrides:
    key, value = item.split('=', 1)
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value == 'True' if isinstance(node[leaf], bool) else type(node[leaf])(value)
  return config


def record(config_arg: str, workdir: str, out_path: str, overrides: list, keep_params: bool,
           keep_relu: bool) -> None:
  """Runs the config in this process (joined to the others when JAX_NUM_PROCESSES is set) and writes the
  per-step metrics and host decisions to `out_path` (process 0)."""
  sys.path.insert(0, ROOT)
  from incremental_jax import backend_tuning
  backend_tuning.set_up()
  import jax
  if os.environ.get('JAX_NUM_PROCESSES'):
    jax.distributed.initialize(os.environ['JAX_COORDINATOR_ADDRESS'], int(os.environ['JAX_NUM_PROCESSES']),
                               int(os.environ['JAX_PROCESS_ID']))
  import incremental_jax
  from incremental_jax import parallel, train
  config = load_config(config_arg, overrides)
  config.progress, config.plots, config.compilation_cache = False, False, ''
  steps, decisions, params, relu_inputs = [], [], [], []
  in_step = [False]   # ReLU calls of inference passes (evaluation, herding) are not recorded
  if keep_relu:
    relu = jax.nn.relu

    def recorded_relu(x):
      def keep(v):   # the smallest |input| of this ReLU call, and where (channel of an NHWC map)
        if not in_step[0]:
          return
        a = np.abs(np.asarray(v)).reshape(-1, v.shape[-1])
        flat = int(np.argmin(a))
        relu_inputs.append({'step': len(steps), 'shape': list(v.shape), 'min': float(a.reshape(-1)[flat]),
                            'channel': flat % v.shape[-1]})
      jax.debug.callback(keep, x)
      return relu(x)

    jax.nn.relu = recorded_relu   # the backbones call jax.nn.relu; this process only

  compiled = train.Trainer._compiled

  def recording(self, key, build):
    fn = compiled(self, key, build)
    if key[0] not in TRAIN_KEYS:
      return fn

    def call(*args):
      task = int(np.asarray(jax.device_get(args[2].index)).reshape(-1)[0])
      in_step[0] = True
      state, metrics = fn(*args)
      metrics = jax.device_get(metrics)
      jax.effects_barrier()   # the step's ReLU records are in
      in_step[0] = False
      if keep_params and key[0] == 'solo':   # one step per call (CPU): the parameters after it
        params.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(state.params))]))
      valid = np.asarray(jax.device_get(args[-1])).reshape(-1) if key[0] == 'chunk' else None
      names = sorted(metrics)
      for i in range(np.asarray(metrics[names[0]]).reshape(-1).size):
        if valid is None or valid[i] > 0:
          steps.append({'task': task, 'phase': key[-1][0], **{n: float(np.asarray(metrics[n]).reshape(-1)[i]) for n in names}})
      return state, metrics

    return call

  broadcast = parallel.broadcast_decision

  def recording_broadcast(value, decision, where):
    agreed = broadcast(value, decision, where)
    decisions.append({'decision': decision, 'where': where, 'value': np.asarray(agreed).tolist(),
                      'own': np.asarray(value).tolist()})
    return agreed

  train.Trainer._compiled = recording
  parallel.broadcast_decision = recording_broadcast
  results = incremental_jax.train_and_evaluate(config, workdir)
  if jax.process_index() == 0:
    if params:
      np.save(out_path[:-len('.json')] + '_params.npy', np.stack(params))
    with open(out_path, 'w') as f:
      json.dump({'steps': steps, 'decisions': decisions, 'relu_inputs': relu_inputs, 'devices': jax.device_count(),
                 'processes': jax.process_count(),
                 'results': {k: results[k] for k in ('avg_incremental_accuracy', 'last_accuracy')},
                 'epoch_losses': [s['epoch_losses'] for s in results['steps']]}, f)


def run_mode(mode: str, args, out: str) -> str:
  """Runs one mode in subprocesses; returns the path of its record."""
  path = os.path.join(out, f'{mode}.json')
  workdir = os.path.join(out, f'{mode}_workdir')
  subprocess.run(['rm', '-rf', workdir], check=True)
  base = [sys.executable, os.path.abspath(__file__), '--config', args.config, '--record', path, '--workdir',
          workdir, *(f'--set={s}' for s in args.set), *(['--params'] if args.params else []),
          *(['--relu'] if args.relu else [])]
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_NUM_PROCESSES')}
  env['JAX_PLATFORMS'] = 'cpu'
  if mode == 'one_device':
    subprocess.run(base, env=env, check=True)
  elif mode == 'devices':
    subprocess.run(base, env={**env, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={args.devices}'},
                   check=True)
  else:
    with socket.socket() as s:
      s.bind(('localhost', 0))
      port = s.getsockname()[1]
    procs = [subprocess.Popen(base, env={**env, 'JAX_COORDINATOR_ADDRESS': f'localhost:{port}',
                                         'JAX_NUM_PROCESSES': str(args.devices), 'JAX_PROCESS_ID': str(i)})
             for i in range(args.devices)]
    if any(p.wait() for p in procs):
      raise RuntimeError(f'mode {mode} failed')
  return path


def _segments(steps: list) -> list[tuple[int, int]]:
  """[(first, last + 1)] of each run of steps of one task and phase."""
  starts = [0] + [i for i in range(1, len(steps))
                  if (steps[i]['task'], steps[i]['phase']) != (steps[i - 1]['task'], steps[i - 1]['phase'])]
  return list(zip(starts, starts[1:] + [len(steps)]))


def _decision_line(a: dict, b: dict) -> str:
  x, y = np.asarray(a['value'], float), np.asarray(b['value'], float)
  if a['decision'] != 'herding':
    return f"{a['decision']} {a['where']}: max |difference| {float(np.abs(x - y).max()):.1e}"
  if x.shape != y.shape:
    return f"herding {a['where']}: memories of different shapes {x.shape} and {y.shape}"
  differ = int((x != y).sum())
  return f"herding {a['where']}: {f'{differ} different exemplars' if differ else 'the same exemplars'}"


def compare(reference: dict, other: dict, threshold: float) -> list[str]:
  """Lines: the results; per task and phase, the largest relative difference of the loss and of each term; the
  first step whose loss differs by more than `threshold` (relative); then the host decisions."""
  a, b = reference['steps'], other['steps']
  lines = [f"{key}: {reference['results'][key]} vs {other['results'][key]}"
           for key in ('avg_incremental_accuracy', 'last_accuracy')]
  if len(a) != len(b):
    lines.append(f'different numbers of steps: {len(a)} vs {len(b)}')
    a, b = a[:min(len(a), len(b))], b[:min(len(a), len(b))]
  first = None
  for start, end in _segments(a):
    terms = {}
    for name in sorted(k for k in a[start] if k not in ('task', 'phase')):
      x, y = (np.array([s[name] for s in steps[start:end]]) for steps in (a, b))
      rel = np.abs(x - y) / np.maximum(np.abs(x), 1e-6)
      terms[name] = float(rel.max())
      if name == 'loss' and first is None and (rel > threshold).any():
        first = (start + int(np.flatnonzero(rel > threshold)[0]), start)
    lines.append(f"task {a[start]['task']} {a[start]['phase']} (steps {start}-{end - 1}): largest relative "
                 'difference ' + ', '.join(f'{n} {v:.1e}' for n, v in terms.items()))
  if first is None:
    lines.append(f'no step with a relative loss difference above {threshold:g}')
  else:
    i, start = first
    lines.append(f"first step with a relative loss difference above {threshold:g}: {i} (task {a[i]['task']}, step "
                 f"{i - start} of its phase): loss {a[i]['loss']:.7g} vs {b[i]['loss']:.7g}; the step before "
                 f"{a[i - 1]['loss']:.7g} vs {b[i - 1]['loss']:.7g}")
  lines += [_decision_line(da, db) for da, db in zip(reference['decisions'], other['decisions'])]
  return lines


def compare_params(a, b, steps: list, relu_inputs: list = ()) -> list[str]:
  """Lines: the relative distance ||a - b|| / ||a|| of the parameters after each step ([steps, P] each), at each
  task's first steps and end, with its growth from the step before; and the largest single-step growth."""
  d = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
  growth = d[1:] / np.maximum(d[:-1], 1e-30)
  lines = []
  for t in sorted({s['task'] for s in steps}):
    idx = [i for i, s in enumerate(steps) if s['task'] == t]
    shown = idx[:6] + idx[-1:]
    lines.append(f'task {t} parameter distance after steps ' + ', '.join(
        f'{i}: {d[i]:.1e}' + (f' (x{growth[i - 1]:.1f})' if i else '') for i in shown))
  worst = int(np.argmax(growth)) + 1
  lines.append(f'largest one-step growth of the parameter distance: x{growth[worst - 1]:.1f} at step {worst} '
               f'(task {steps[worst]["task"]}), from {d[worst - 1]:.1e} to {d[worst]:.1e}')
  near = [r for r in relu_inputs if r['step'] == worst]
  if near:
    lines.append(f'smallest |input| of each ReLU call of step {worst} (in the first run): ' + ', '.join(
        f"{r['min']:.1e} (shape {r['shape']}, channel {r['channel']})" for r in near))
  return lines


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/lucir.py:test')
  parser.add_argument('--devices', type=int, default=2, help='devices (b) and processes (c)')
  parser.add_argument('--modes', default='one_device,devices,processes')
  parser.add_argument('--threshold', type=float, default=1e-4)
  parser.add_argument('--out', default='/tmp/host_divergence')
  parser.add_argument('--set', action='append', default=[], help='config override key=value (repeatable)')
  parser.add_argument('--params', action='store_true',
                      help='also keep the parameters after every step (small models only) and compare them')
  parser.add_argument('--relu', action='store_true',
                      help="also keep each ReLU call's smallest |input| per step and show them where the parameters "
                           'jump most (with --params)')
  parser.add_argument('--reuse', action='store_true', help='keep the records already in --out')
  parser.add_argument('--record', help=argparse.SUPPRESS)
  parser.add_argument('--workdir', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.record:
    record(args.config, args.workdir, args.record, args.set, args.params, args.relu)
    return 0
  os.makedirs(args.out, exist_ok=True)
  modes = args.modes.split(',')
  paths = {m: os.path.join(args.out, f'{m}.json') if args.reuse and os.path.exists(os.path.join(args.out, f'{m}.json'))
           else run_mode(m, args, args.out) for m in modes}
  records = {}
  for m, p in paths.items():
    with open(p) as f:
      records[m] = json.load(f)
  for m in modes[1:]:
    print(f'== {modes[0]} vs {m}')
    print('\n'.join(compare(records[modes[0]], records[m], args.threshold)))
    params = [os.path.join(args.out, f'{mode}_params.npy') for mode in (modes[0], m)]
    if args.params and all(os.path.exists(p) for p in params):
      print('\n'.join(compare_params(*(np.load(p) for p in params), records[modes[0]]['steps'],
                                      records[modes[0]].get('relu_inputs', []))))
  return 0


if __name__ == '__main__':
  sys.exit(main())
