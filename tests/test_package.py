"""The package's shape: no import circle among its modules, imports that run one way
through its layers, files short enough to read, and stage-specific code in the stage
files only."""

import ast
import pathlib
import re


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


# The layers, lowest first: a module imports its own layer and those below only.
LAYERS = ('errors', 'models', 'storage', 'data', 'config', 'stages', 'training',
          'inference', 'evaluation', 'entry points')
TOP_LEVEL = {'errors': 'errors', 'config_checks': 'config', 'config_lib': 'config',
             'cli': 'entry points', 'evaluate': 'entry points',
             'memory': 'entry points', 'resilience': 'entry points',
             'serve': 'entry points'}


def layer(module: str) -> str:
  """'tokcom_jax.models.vae' → 'models'; the package itself is an entry point."""
  parts = module.split('.')
  if len(parts) == 1:
    return 'entry points'
  return TOP_LEVEL.get(parts[1], parts[1])


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
  rank = lambda m: LAYERS.index(layer(m))
  return [f'{m} -> {i}' for m, imports in sorted(graph.items())
          for i in sorted(imports) if rank(i) > rank(m)]


def test_upward_imports_finds_a_planted_one():
  assert upward_imports({'tokcom_jax.models.vae': {'tokcom_jax.training.steps'},
                         'tokcom_jax.training.steps': {'tokcom_jax.models.vae'}}) == [
      'tokcom_jax.models.vae -> tokcom_jax.training.steps']


def test_every_module_sits_in_a_named_layer_and_imports_only_downward():
  graph = import_graph()
  assert {layer(m) for m in graph} == set(LAYERS), 'a module outside the layers'
  assert upward_imports(graph) == []


def test_model_code_imports_only_models_and_errors():
  for module, imports in import_graph().items():
    if layer(module) == 'models':
      assert {layer(i) for i in imports} <= {'models', 'errors'}, module


def test_below_the_trainer_nothing_picks_a_stage_by_name():
  """The stage registry (`tokcom_jax.stages`) is read by the trainer and the layers
  above it; training's other modules know only the interface (`stages.base`)."""
  graph = import_graph()
  for module, imports in graph.items():
    if LAYERS.index(layer(module)) <= LAYERS.index('training') and (
        module != 'tokcom_jax.training.trainer'):
      named = {i for i in imports if i.startswith('tokcom_jax.stages')}
      allowed = {'tokcom_jax.stages.base'} if layer(module) != 'stages' else named
      assert named <= allowed, module


def test_files_stay_short():
  long = {module_name(p): n for p in PACKAGE.rglob('*.py')
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not long, long


def test_the_readme_layout_names_every_module():
  readme = (PACKAGE.parent / 'README.md').read_text()
  layout = readme.split('\n## Layout\n', 1)[1].split('\n## ', 1)[0]
  named = set(re.findall(r'^\s*(?:tokcom_jax/)?(\S+\.(?:py|html))\s', layout, re.M))
  files = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob('*')
           if p.suffix in ('.py', '.html') and p.name != '__init__.py'
           and '__pycache__' not in p.parts}
  assert files - named == set(), 'modules the README layout leaves out'
