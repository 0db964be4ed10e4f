"""State flows as values: no function of the package assigns to an attribute or an item of an object it received
(a parameter other than `self`, or an element of one it loops over), nor calls a mutating method (`append`,
`update`, ...) on one. A function that
rebinds the parameter's name first (`x = x.copy()`) works on its own object. Objects' own private bookkeeping
(`self._cache[key] = ...`) is theirs. Preset builders (`config.py`'s presets and `configs/`) are exempt: they edit
the fresh config `get_config` made for them, the ml_collections idiom."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'incremental_jax'
MUTATORS = ('append', 'extend', 'update', 'pop', 'insert', 'clear', 'setdefault', 'remove', 'add', 'popitem', 'sort',
            'reverse')
PRESET_BUILDERS = {('config.py', 'digits'), ('config.py', 'preset'), ('config.py', 'test_preset')}


def _root_name(node):
  while isinstance(node, (ast.Attribute, ast.Subscript)):
    node = node.value
  return node.id if isinstance(node, ast.Name) else None


def _is_zip(node) -> bool:
  return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ('enumerate', 'zip',
                                                                                            'reversed')


def mutations(source: str, filename: str = '') -> list[str]:
  """'file:line: function assigns/calls ...' for each mutation of a received object in `source`."""
  found = []
  for fn in ast.walk(ast.parse(source)):
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    a = fn.args
    params = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs} | {x.arg for x in (a.vararg, a.kwarg) if x}
    loops = [n for n in ast.walk(fn) if isinstance(n, (ast.For, ast.comprehension))]
    loop_names = {n.id for loop in loops for n in ast.walk(loop.target) if isinstance(n, ast.Name)}
    rebound = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)} - loop_names
    received = params - rebound - {'self', 'cls'}
    for loop in loops:   # the elements of a received collection are received too (`for k, run in enumerate(runs)`)
      sources = [loop.iter]
      while any(_is_zip(n) for n in sources):
        sources = [a for n in sources for a in (n.args if _is_zip(n) else [n])]
      if any(isinstance(n, ast.Name) and n.id in received for n in sources):
        received |= {n.id for n in ast.walk(loop.target) if isinstance(n, ast.Name)}
    for node in ast.walk(fn):
      targets = (node.targets if isinstance(node, (ast.Assign, ast.Delete)) else
                 [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
      for target in targets:
        for el in (target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]):
          if isinstance(el, (ast.Attribute, ast.Subscript)) and _root_name(el) in received:
            found.append(f'{filename}:{node.lineno}: {fn.name} assigns {ast.unparse(el)}')
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS
          and _root_name(node.func.value) in received):
        found.append(f'{filename}:{node.lineno}: {fn.name} calls {ast.unparse(node.func)}')
  return found


def test_the_checker_finds_each_kind_of_mutation():
  source = '''
def a(state, xs, d, self):
  state.step = 1
  xs[0] += 1
  d.update(k=1)
  self.cache = 1
def b(cfg, runs):
  cfg = cfg.copy()
  cfg.x = 1
  for k, run in enumerate(runs):
    run.history.append(k)
'''
  assert [m.split(': ', 1)[1] for m in mutations(source)] == [
      'a assigns state.step', 'a assigns xs[0]', 'a calls d.update', 'b calls run.history.append']


def test_no_function_mutates_what_it_received():
  found = []
  for p in sorted(PACKAGE.rglob('*.py')):
    path = p.relative_to(PACKAGE).as_posix()
    if 'configs' not in p.relative_to(PACKAGE).parts:
      found += [m for m in mutations(p.read_text(), path)
                if (path, m.split(': ')[1].split(' ')[0]) not in PRESET_BUILDERS]
  assert not found, '\n'.join(found)
