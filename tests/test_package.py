"""The package's shape: no import circle among its modules, files short enough to
read, and stage-specific code in the stage files only."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'tokcom_jax'
MAX_LINES = 320


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph(root=PACKAGE) -> dict[str, set[str]]:
  """Module → the package modules it imports (at any depth of its code: imports
  inside functions close circles at run time too)."""
  modules = {module_name(p): p for p in root.rglob('*.py')}
  package = root.name
  graph = {}
  for name, path in modules.items():
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        base = node.module
        if node.level:  # relative import
          base = '.'.join(name.split('.')[:-node.level] + [node.module])
        targets = [base] + [f'{base}.{a.name}' for a in node.names]
      edges |= {t for t in targets if t in modules and t not in (name, package)}
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle as a path [a, b, …, a], or None (depth-first search)."""
  state, stack = {}, []

  def visit(v):
    state[v] = 'open'
    stack.append(v)
    for w in sorted(graph[v]):
      if state.get(w) == 'open':
        return stack[stack.index(w):] + [w]
      if w not in state and (cycle := visit(w)):
        return cycle
    state[v] = 'done'
    stack.pop()
    return None

  for v in sorted(graph):
    if v not in state and (cycle := visit(v)):
      return cycle
  return None


def test_find_cycle_finds_a_planted_circle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == [
      'a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}) is None


def test_the_package_imports_form_no_circle():
  graph = import_graph()
  assert 'tokcom_jax.errors' in graph and graph['tokcom_jax.errors'] == set()
  assert find_cycle(graph) is None, ' → '.join(find_cycle(graph))


def test_no_module_below_the_trainer_imports_a_stage():
  """The trainer, evaluation, sampling and reports may use stages; the library
  beneath them (layers, models, data, sharding, checkpoints, steps) may not."""
  graph = import_graph()
  above = {'tokcom_jax.train_lib', 'tokcom_jax.memory', 'tokcom_jax.evaluate',
           'tokcom_jax.lm_sampling',
           'tokcom_jax.sampling', 'tokcom_jax.resilience', 'tokcom_jax.stages'}
  for module, imports in graph.items():
    if module in above or module.startswith('tokcom_jax.stages.'):
      continue
    assert not {i for i in imports if i.startswith('tokcom_jax.stages')}, module


def test_files_stay_short():
  long = {module_name(p): n for p in PACKAGE.rglob('*.py')
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not long, long
