"""The package's import graph has no circle (each floor imports only lower ones), importing a building block does
not load the run machinery, and importing the package changes nothing outside the process."""
import ast
import collections
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module_imports() -> dict:
  """{module: modules of the package it imports}, counting the imports inside functions too: a lazy import breaks
  a circle at import time, not in the layering (the lower module still reaches up). `from pkg import sub` counts as
  importing `pkg.sub`."""
  mods = {}
  for d, _, files in os.walk(os.path.join(ROOT, 'incremental_jax')):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(d, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        mods[name[:-len('.__init__')] if name.endswith('.__init__') else name] = path
  graph = collections.defaultdict(set)
  for name, path in mods.items():
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('incremental_jax'):
        targets = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in mods else node.module for a in node.names]
      elif isinstance(node, ast.Import):
        targets = [a.name for a in node.names if a.name.startswith('incremental_jax')]
      else:
        continue
      graph[name].update(t for t in targets if t in mods and t != name)
  return graph


def _cycles(graph: dict) -> list:
  state, stack, found = {}, [], []

  def visit(u):
    state[u] = 'open'
    stack.append(u)
    for v in sorted(graph.get(u, ())):
      if state.get(v) == 'open':
        found.append(stack[stack.index(v):] + [v])
      elif v not in state:
        visit(v)
    stack.pop()
    state[u] = 'done'

  for u in sorted(graph):
    if u not in state:
      visit(u)
  return found


def test_the_import_graph_has_no_circle():
  graph = _module_imports()
  assert 'incremental_jax.step' in graph['incremental_jax.train']      # the graph is read (not empty)
  assert 'incremental_jax.methods' in graph['incremental_jax.listing']  # with the imports inside functions
  assert _cycles(graph) == []
  assert _cycles({'a': {'b'}, 'b': {'a'}}) == [['a', 'b', 'a']]        # and a circle would be found


def test_importing_the_losses_loads_no_run_machinery():
  code = ('import sys, incremental_jax.losses; '
          "print(sorted(m for m in sys.modules if m in ('incremental_jax.run', 'incremental_jax.train', "
          "'incremental_jax.methods')))")
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == '[]'


# Run in a fresh interpreter: the events of the audit hook (PEP 578) that start a process, and the environment
# variables that the package's imports changed (JAX's own import sets TF_CPP_MIN_LOG_LEVEL and TPU_SKIP_MDS_QUERY,
# so it comes first). The jaxlib version is read as one that was not measured, the case in which the XLA:CPU
# flags need a subprocess probe and a cache file (backend_tuning), which must wait for `set_up()`.
_IMPORT_CODE = """
import json, os, sys
from importlib import metadata
SPAWNING = ('subprocess.Popen', 'os.system', 'os.fork', 'os.forkpty', 'os.posix_spawn', 'os.exec', 'os.spawn')
spawned = []
sys.addaudithook(lambda event, args: spawned.append(event) if event in SPAWNING else None)
version = metadata.version
metadata.version = lambda name: '0.99.0' if name == 'jaxlib' else version(name)
import jax
before = dict(os.environ)
import incremental_jax, incremental_jax.run
changed = sorted(k for k in before.keys() | os.environ.keys() if before.get(k) != os.environ.get(k))
print(json.dumps([changed, spawned]))
"""


def test_importing_the_package_changes_no_variable_starts_no_process_and_writes_no_file(tmp_path):
  home, cache = tmp_path / 'home', tmp_path / 'cache'
  home.mkdir()
  cache.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'INCREMENTAL_JAX_XLA_CPU_FLAGS')}
  out = subprocess.run([sys.executable, '-c', _IMPORT_CODE], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**env, 'HOME': str(home), 'XDG_CACHE_HOME': str(cache)})
  assert out.returncode == 0, out.stderr[-2000:]
  changed, spawned = json.loads(out.stdout.splitlines()[-1])
  assert changed == [] and spawned == []
  assert sorted(tmp_path.rglob('*')) == [cache, home]   # nothing written under either
