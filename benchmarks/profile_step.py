"""Where the LUCIR train step's time goes, in incremental_jax and in PyTorch, grouped by kind of operation.

The step is the one `benchmarks/vs_torch.py` times (CIFAR ResNet-32, batch 128, frozen teacher, CE + less-forget +
margin ranking, SGD). JAX side: a `jax.profiler` trace of `--steps` compiled steps; every thunk of the compiled
program (an HLO fusion, convolution, product or copy) is classified from the optimised HLO: by what it computes
(convolution, matrix product, transpose or copy at its root) and by the source line JAX recorded for its
operations (the materialising product of `models/conv.py`, BatchNorm, the optimiser update of `step.py`, the
augmentation, the losses and head). XLA:CPU runs convolutions asynchronously on its thread pool, so a thunk's own
event ends before its work does: each thunk is charged its own event, and the rest of the wall time until the next
thunk starts goes to the convolution last started (whose work the executor is waiting for), so the table adds up
to the step's wall time. PyTorch side: `torch.profiler`
self CPU time per aten operator, grouped the same way.

    python benchmarks/profile_step.py                 # both tables, 3 profiled steps
    python benchmarks/profile_step.py --side=jax --top=20

Prints figures; asserts nothing. PyTorch is needed only for `--side=torch|both` (`pip install torch==2.13.0`).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vs_torch  # noqa: E402  (sets OMP_WAIT_POLICY before torch loads)
from incremental_jax import backend_tuning  # noqa: E402

KINDS = ('convolutions', 'conv + product fusions', 'materialising products', 'other matrix products',
         'transposes / copies', 'batch norm', 'ReLU, residual adds', 'optimiser + update masks', 'losses + head',
         'augmentation + RNG', 'reductions (other)', 'elementwise (other)')


# ------------------------------------------------------------------------------------------- HLO side
class Hlo:
  """The optimised HLO module's instructions (name -> opcode, called computations, metadata) and JAX's stack
  frames (frame id -> innermost file, function and line, with its parent)."""

  def __init__(self, text: str):
    self.comps: dict[str, list] = {}
    self.instr: dict[str, tuple] = {}
    self._frames(text)
    cur = None
    for line in text.splitlines():
      if line and not line.startswith(' ') and line.rstrip().endswith('{'):
        m = re.match(r'^(?:ENTRY )?%(\S+) ', line)
        cur = m.group(1) if m else None
        if cur:
          self.comps[cur] = []
        continue
      m = re.match(r'^\s+(ROOT )?%(\S+) = .*? ([a-z][a-z0-9\-]*)\(', line)
      if m and cur:
        frame = re.search(r'stack_frame_id=(\d+)', line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        rec = (m.group(2), m.group(3), re.findall(r'(?:calls|to_apply|body|condition)=%([\w.\-]+)', line),
               op_name.group(1) if op_name else '', int(frame.group(1)) if frame else 0, bool(m.group(1)))
        self.comps[cur].append(rec)
        self.instr[rec[0]] = rec

  def _frames(self, text: str):
    def table(title):
      m = re.search(rf'^{title}\n((?:\d+ .*\n)*)', text, re.M)
      return dict(re.match(r'(\d+) (.*)', row).groups() for row in m.group(1).splitlines()) if m else {}
    files = {int(k): v.strip('"') for k, v in table('FileNames').items()}
    funcs = {int(k): v.strip('"') for k, v in table('FunctionNames').items()}
    locs = {}
    for k, v in table('FileLocations').items():
      g = dict(re.findall(r'(\w+)=(\d+)', v))
      locs[int(k)] = (files.get(int(g['file_name_id']), ''), funcs.get(int(g['function_name_id']), ''),
                      int(g['line']))
    self.frames = {}
    for k, v in table('StackFrames').items():
      g = dict(re.findall(r'(\w+)=(\d+)', v))
      self.frames[int(k)] = (locs.get(int(g['file_location_id']), ('', '', 0)), int(g['parent_frame_id']))

  def stack(self, frame_id: int) -> list[tuple]:
    out, seen = [], set()
    while frame_id and frame_id not in seen and frame_id in self.frames:
      seen.add(frame_id)
      loc, frame_id = self.frames[frame_id]
      out.append(loc)
    return out

  def inner(self, name: str) -> list[tuple]:
    """(opcode, op_name, stack) of `name` and of every instruction of the computations it calls."""
    rec = self.instr[name]
    out = [(rec[1], rec[3], self.stack(rec[4]))]
    todo = list(rec[2])
    while todo:
      for r in self.comps.get(todo.pop(), []):
        out.append((r[1], r[3], self.stack(r[4])))
        todo.extend(r[2])
    return out

  def root_stack(self, name: str) -> list[tuple]:
    rec = self.instr[name]
    if rec[1] == 'fusion' and rec[2]:
      roots = [r for r in self.comps.get(rec[2][0], []) if r[5]]
      if roots:
        return self.stack(roots[0][4])
    return self.stack(rec[4])

  def root_opcode(self, name: str) -> str:
    rec = self.instr[name]
    if rec[1] != 'fusion' or not rec[2]:
      return rec[1]
    roots = [r[1] for r in self.comps.get(rec[2][0], []) if r[5]]
    return roots[0] if roots else rec[1]


_BACKBONE = ('BasicBlock.__call__', 'Bottleneck.__call__', 'Shortcut.__call__', 'ResNet.__call__')


def classify(hlo: Hlo, name: str) -> str:
  """The kind (KINDS) of HLO instruction `name`."""
  if name not in hlo.instr:
    return 'elementwise (other)'
  inner = hlo.inner(name)
  ops = {op for op, _, _ in inner}
  funcs = {f.rsplit('.<locals>.', 1)[-1] for _, _, st in inner for _, f, _ in st}
  files = {os.path.basename(p) for _, _, st in inner for p, _, _ in st}
  if 'convolution' in ops:
    return 'conv + product fusions' if 'dot' in ops else 'convolutions'
  if 'dot' in ops:
    return 'materialising products' if 'materialize' in funcs else 'other matrix products'
  if hlo.root_opcode(name) in ('transpose', 'copy'):
    return 'transposes / copies'
  root_funcs = {f.rsplit('.<locals>.', 1)[-1] for _, f, _ in hlo.root_stack(name)}
  update_funcs = {'train_step', '<lambda>', 'advanced', 'head_update_mask', 'masked_descent', 'apply_updates'}
  if root_funcs & update_funcs:   # step.py's update (optax inside)
    return 'optimiser + update masks'
  if 'normalization.py' in files:   # flax's BatchNorm (flax/nnx/nn/normalization.py)
    return 'batch norm'
  prims = {n.rsplit('/', 1)[-1] for op, n, st in inner if st and st[0][1] in _BACKBONE}
  if prims & {'rsqrt', 'square', 'div', 'reduce_sum'}:
    return 'batch norm'
  if prims:
    return 'ReLU, residual adds'
  if funcs & (update_funcs - {'train_step'}) or any(
      st and st[0][1].endswith('train_step') for _, n, st in inner):
    return 'optimiser + update masks'
  if files & {'lucir.py', 'classification.py', 'heads.py', 'cosine.py', 'distillation.py', 'network.py'}:
    return 'losses + head'
  if 'augment.py' in files or any('threefry' in n or 'random' in n for _, n, _ in inner):
    return 'augmentation + RNG'
  if 'reduce' in ops:
    return 'reductions (other)'
  return 'elementwise (other)'


def jax_profile(args) -> tuple[dict, collections.Counter, float]:
  import jax
  run, _, compiled = vs_torch.jax_step(args)
  hlo = Hlo(compiled.as_text())
  module = compiled.as_text().split('\n', 1)[0].split()[1].rstrip(',')
  run(args.warmup)
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    t0 = time.perf_counter()
    run(args.steps)
    wall = (time.perf_counter() - t0) / args.steps
    jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(tmp, '**', '*.trace.json.gz'), recursive=True))[-1]
    events = json.load(gzip.open(path))['traceEvents']
  thunks = sorted((e for e in events if e.get('ph') == 'X' and e.get('args', {}).get('hlo_module') == module
                   and 'hlo_op' in e['args']), key=lambda e: e['ts'])
  by_kind, by_op, count = collections.Counter(), collections.Counter(), collections.Counter()
  in_flight = None   # the last convolution started: XLA:CPU runs those asynchronously on its thread pool
  for a, b in zip(thunks, thunks[1:] + [None]):
    span = a['dur'] if b is None or b['ts'] - a['ts'] > 50_000 else b['ts'] - a['ts']   # 50 ms: a step boundary
    op = a['args']['hlo_op']
    kind = classify(hlo, op)
    if kind in ('convolutions', 'conv + product fusions'):
      in_flight = (op, kind)
    own = min(a['dur'], span)
    for (name, k), ms in (((op, kind), own), (in_flight or (op, kind), span - own)):
      by_kind[k] += ms / 1000 / args.steps
      by_op[(name, k)] += ms / 1000 / args.steps
    count[kind] += 1 / args.steps
  return {k: (by_kind[k], count[k]) for k in by_kind}, by_op, 1000 * wall


# --------------------------------------------------------------------------------------- PyTorch side
_TORCH_KINDS = (
    ('convolutions', ('conv', 'mkldnn_convolution', 'convolution_backward', 'slow_conv')),
    ('batch norm', ('batch_norm', 'native_batch_norm')),
    ('ReLU, residual adds', ('relu', 'clamp_min', 'threshold_backward', 'aten::add')),
    ('optimiser + update masks', ('_foreach', 'sgd', 'optimizer', 'zero_grad')),
    ('other matrix products', ('mm', 'addmm', 'matmul', 'linear', 'bmm')),
    ('transposes / copies', ('copy_', 'contiguous', 'clone', 'permute', 'transpose', 'to_mkldnn', 'reorder')),
    ('augmentation + RNG', ('gather', 'randint', 'rand', 'flip', 'pad', 'constant_pad', 'where')),
    ('losses + head', ('cross_entropy', 'log_softmax', 'nll', 'norm', 'cosine', 'margin', 'topk', 'masked_fill',
                       'normalize', 'div', 'clamp_min')),
    ('reductions (other)', ('sum', 'mean')),
)


def torch_kind(op: str) -> str:
  low = op.lower()
  for kind, keys in _TORCH_KINDS:
    if any(k in low for k in keys):
      return kind
  return 'elementwise (other)'


def torch_profile(args) -> tuple[dict, collections.Counter, float]:
  from torch import profiler
  run, _ = vs_torch.torch_step(args)
  run(args.warmup)
  t0 = time.perf_counter()
  with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
    run(args.steps)
  wall = (time.perf_counter() - t0) / args.steps
  by_kind, by_op, count = collections.Counter(), collections.Counter(), collections.Counter()
  for e in prof.key_averages():
    if e.key.startswith('ProfilerStep') or e.self_cpu_time_total <= 0:
      continue
    kind = torch_kind(e.key)
    ms = e.self_cpu_time_total / 1000 / args.steps
    by_kind[kind] += ms
    by_op[(e.key, kind)] += ms
    count[kind] += e.count / args.steps
  return {k: (by_kind[k], count[k]) for k in by_kind}, by_op, 1000 * wall


# ------------------------------------------------------------------------------------------------ main
def print_table(title: str, table: dict, by_op: collections.Counter, wall_ms: float, top: int):
  total = sum(ms for ms, _ in table.values())
  print(f'\n{title}: {wall_ms:.0f} ms/step wall while profiled, {total:.0f} ms attributed')
  print(f'| kind | ms/step | share | ops/step |\n|---|---|---|---|')
  for kind in sorted(table, key=lambda k: -table[k][0]):
    ms, n = table[kind]
    print(f'| {kind} | {ms:.1f} | {100 * ms / total:.1f}% | {n:.0f} |')
  print(f'largest {top}:')
  for (op, kind), ms in by_op.most_common(top):
    print(f'  {ms:7.1f} ms  {op}  [{kind}]')


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--side', default='both', choices=('both', 'jax', 'torch'))
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=3, help='profiled steps')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--top', type=int, default=12, help='largest single operations listed')
  parser.add_argument('--dtype', default='float32')
  args = parser.parse_args()
  backend_tuning.set_up()   # its XLA:CPU flags, before the first computation
  if args.side in ('both', 'jax'):
    import jax
    print_table(f'incremental_jax (JAX {jax.__version__}, {jax.devices()[0].platform})', *jax_profile(args), args.top)
  if args.side in ('both', 'torch'):
    import torch
    print_table(f'PyTorch {torch.__version__}', *torch_profile(args), args.top)


if __name__ == '__main__':
  main()
