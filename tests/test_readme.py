"""The README tells the truth: its commands run, its Python example runs, and `make`
runs its set-up and test commands.

A block is marked by an HTML comment on the line before its fence:
  <!-- tested -->            each line is run by bash, in order, in one directory, with
                             `configs/tiny.py` lines made micro-sized (`--config.…`
                             flags appended: a few steps of small models on a small
                             corpus of standard-library files in ~/code) and
                             `evaluate` lines on 8 samples of 32 windows
  <!-- tested offline… -->   its first line is run with HF_HUB_OFFLINE=1: one line
  <!-- run by make demo and make test -->   `make -n` prints each of its commands
The ```python block marked tested runs against the micro runs of train_fixtures.
Sections not marked (multi-host, pods, benchmarks, kill tests) need hardware,
a cloud or minutes of CPU, and have tests of their own where they can.
"""

import importlib
import json
import logging
import os
import pathlib
import re
import shlex
import subprocess
import sys
import sysconfig
import tomllib
import types

import pytest

from configs import tiny
from tests import background as background_lib
from tests import train_fixtures
from tokcom_jax import config_lib


REPO = pathlib.Path(__file__).resolve().parent.parent
README = REPO / 'README.md'
# The micro config of train_fixtures, with the ar stage made as small.
MICRO = {**train_fixtures.MICRO, 'train.ar.num_steps': 8, 'ar.hidden_size': 32,
         'ar.num_layers': 1, 'ar.num_heads': 2, 'ar.num_kv_heads': 1,
         'ar.intermediate_size': 64}
EVALUATE_MICRO = ('--num_samples=8', '--num_windows=32', '--batch_size=8')


def marked_blocks(marker: str, language: str) -> list[str]:
  """The ```language blocks right after a line that starts with `marker`."""
  lines = README.read_text().splitlines()
  blocks = []
  for i, line in enumerate(lines[:-1]):
    if line.startswith(marker) and lines[i + 1] == f'```{language}':
      end = lines.index('```', i + 2)
      blocks.append('\n'.join(lines[i + 2:end]))
  return blocks


def commands(block: str) -> list[str]:
  """A block's commands: comments cut, `a && b` split."""
  out = []
  for line in block.splitlines():
    line = re.sub(r'\s+#\s.*$', '', line).strip()
    out += [c.strip() for c in line.split(' && ')] if line else []
  return out


def micro(line: str, corpus: str, cache: str) -> str:
  """A `python train.py --config configs/tiny.py:<stage>` line, micro-sized, an
  evaluation on fewer samples and windows (and any line without its comment)."""
  line = re.sub(r'\s+#\s.*$', '', line)
  if line.startswith('python -m tokcom_jax.evaluate'):
    return line + ' ' + ' '.join(EVALUATE_MICRO)
  match = re.search(r'configs/tiny\.py:(\w+)', line)
  if not line.startswith('python train.py') or not match:
    return line
  base = tiny.get_config(match.group(1))
  mods = {**MICRO, 'data.cache_dir': cache}
  if 'data.source' not in line:  # else the README's own source, in ~
    mods['data.source'] = corpus
  return ' '.join([line] + [shlex.quote(f'--config.{config_lib._resolve(base, k)}={v}')
                            for k, v in mods.items()])


@pytest.fixture
def clone(tmp_path):
  return make_clone(tmp_path)


def make_clone(tmp_path):
  """(directory with the entry points and configs, environment): a user's clone,
  whose `python` is this one and whose home holds ~/code, a small corpus."""
  work, home, bin_dir = tmp_path / 'work', tmp_path / 'home', tmp_path / 'bin'
  for d in (work, home / 'code' / 'a', home / 'code' / 'b', bin_dir):
    d.mkdir(parents=True)
  for name in ('train.py', 'sample.py', 'configs'):
    (work / name).symlink_to(REPO / name)
  stdlib = pathlib.Path(sysconfig.get_paths()['stdlib'])
  for i, path in enumerate(sorted(stdlib.glob('*.py'))[:40]):
    (home / 'code' / 'ab'[i % 2] / path.name).write_text(path.read_text('utf-8'))
  (bin_dir / 'python').write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
  (bin_dir / 'python').chmod(0o755)
  env = dict(os.environ, HOME=str(home), PYTHONPATH=str(REPO),
             PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
             TOKCOM_JAX_CACHE=str(tmp_path / 'cache'),
             MPLCONFIGDIR=os.environ.get('MPLCONFIGDIR', str(
                 pathlib.Path.home() / '.config' / 'matplotlib')))
  return work, env


def run_block(block: str, work, env, **extra_env):
  script = '\n'.join(['set -euo pipefail'] + [
      micro(line, 'files:~/code/**/*.py', str(work.parent / 'cache'))
      for line in block.splitlines()])
  return background_lib.run(['bash', '-c', script], cwd=work, env={**env, **extra_env},
                            timeout=300)


def shell_blocks(scratch, corpus):
  """(the clone, each tested block with what running it gave), in order."""
  work, env = make_clone(scratch)
  blocks = marked_blocks('<!-- tested -->', 'bash')
  return work, [(block, run_block(block, work, env)) for block in blocks]


@pytest.mark.slow
@pytest.mark.background(job=shell_blocks)
def test_the_tested_shell_blocks_run_on_the_micro_config(background):
  work, outs = background(shell_blocks)
  assert len(outs) == 3 and 'configs/tiny.py:all' in outs[0][0]
  for block, out in outs:
    assert out.returncode == 0, f'{block}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}'
  runs = work / 'runs'
  # The quick start: both stages, samples, and eval.json naming the run as given,
  # scored against the baseline trained next to it.
  result = json.loads((runs / 'tiny' / 'diffusion' / 'eval.json').read_text())
  assert result['workdir'] == 'runs/tiny/diffusion'
  quality = result['generation_quality']
  assert quality['reference'] == 'runs/tiny/ar'
  assert set(quality['rows']) == {'real', 'shuffled', 'tokcom', 'ar'}
  assert all((runs / 'tiny' / s / 'checkpoints').is_dir() for s in ('vae', 'ar'))
  # Own data: the glob in ~ was read, into the workdir the README names.
  config = json.loads((runs / 'mycode' / 'vae' / 'config.json').read_text())
  assert config['data']['source'] == 'files:~/code/**/*.py'
  assert (runs / 'mycode' / 'diffusion' / 'checkpoints').is_dir()


@pytest.mark.slow
def test_the_v52_block_stops_offline_with_one_line_naming_the_tiny_config(clone):
  work, env = clone
  (block,) = marked_blocks('<!-- tested offline', 'bash')
  first = commands(block)[0]
  assert first == 'python train.py --config configs/v52.py:vae'
  out = run_block(first, work, env, HF_HUB_OFFLINE='1',
                  HF_HOME=str(work.parent / 'hf'))  # an empty hub cache
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: cannot load tokenizer')
  assert '`--config configs/tiny.py:all`' in lines[0]


def test_the_python_api_example_runs(runs, ar_run, tmp_path, monkeypatch, capsys):
  (code,) = marked_blocks('<!-- tested -->', 'python')
  (tmp_path / 'runs').mkdir()
  (tmp_path / 'runs' / 'tiny').symlink_to(pathlib.Path(runs[1]).parent)  # vae, diffusion, ar
  monkeypatch.chdir(tmp_path)
  names = {}
  exec(compile(code, str(README), 'exec'), names)
  model, baseline = names['model'], names['baseline']
  assert len(names['texts']) == 2
  assert all(t.startswith('def main():') for t in names['texts'])
  N, K, Z = model.max_chunks, model.chunk_size, model.latent_dim
  assert names['latents'].shape == (2, N, Z) and names['tokens'].shape == (2, N * K)
  ids = model.tokenizer('import os\n', add_special_tokens=False)['input_ids']
  assert names['z'].shape == (-(-len(ids) // K), Z)
  assert [c.shape for c in names['ce']] == [(3,)]
  assert type(baseline).__name__ == 'AutoregressiveLM'
  assert capsys.readouterr().out.count('\n') >= 2  # both print lines printed


# ----- make, CI and the README run one set of commands


def make_n(target: str, *variables: str) -> list[str]:
  """The commands `make target` would run, from scratch (-B), without running them."""
  # Under `make test VENV=…` (CI), the outer make hands VENV down, in MAKEFLAGS and
  # in the environment (make exports command-line variables); a user's make has neither.
  env = {k: v for k, v in os.environ.items()
         if k not in ('MAKEFLAGS', 'MFLAGS', 'MAKELEVEL', 'VENV', 'PYTHON')}
  out = subprocess.run(['make', '--no-print-directory', '-n', '-B', target, *variables],
                       cwd=REPO, capture_output=True, text=True, check=True, env=env)
  return out.stdout.splitlines()


def test_make_demo_is_the_readme_set_up_then_the_quick_start():
  demo = make_n('demo')
  (setup,) = marked_blocks('<!-- run by make demo and make test -->', 'bash')
  for command in commands(setup):
    if command != 'source .venv/bin/activate':  # make puts .venv/bin first on PATH
      assert any(command in line for line in demo), command
  quick = commands(marked_blocks('<!-- tested -->', 'bash')[0])
  assert [line for line in demo if line.startswith('python ')] == quick


def test_make_test_and_ci_run_the_readme_test_command(tmp_path):
  tests_section = README.read_text().split('\n## Tests\n', 1)[1]
  command = commands(tests_section.split('```bash\n', 1)[1].split('```', 1)[0])
  assert command == ['python -m pytest -q tests']
  venv = tmp_path / 'venv'
  lines = make_n('test', f'VENV={venv}')
  assert lines[-1] == command[0]
  assert f'python3 -m venv {venv}' in '\n'.join(lines)
  assert 'pip install -r requirements.txt -c constraints.txt' in '\n'.join(lines)
  ci = (REPO / '.ci' / 'run').read_text()
  assert re.search(r'^make test VENV="\$\(mktemp -d\)/venv"$', ci, re.M)


# ----- what the README says about Python, wandb and the install


def test_the_supported_python_is_stated_and_checked(monkeypatch):
  project = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']
  assert project['requires-python'] == '>=3.11'
  assert '**Python 3.11 or newer**' in README.read_text()
  import tokcom_jax
  monkeypatch.setattr(sys, 'version_info', (3, 10, 12, 'final', 0))
  with pytest.raises(SystemExit) as info:
    importlib.reload(tokcom_jax)
  assert info.value.code == ('error: tokcom_jax needs Python 3.11 or newer, not 3.10:'
                             ' make the virtual environment with python3.11 (or newer).')


def test_constraints_pin_every_requirement_exactly():
  pins = {}
  for line in (REPO / 'constraints.txt').read_text().splitlines():
    if line and not line.startswith('#'):
      name, version = line.split('==')
      pins[re.sub(r'[-_.]+', '-', name).lower()] = version
  for line in (REPO / 'requirements.txt').read_text().splitlines():
    name = re.sub(r'[-_.]+', '-', re.split(r'[\[>=<]', line)[0]).lower()
    assert name in pins, f'{name} is not pinned in constraints.txt'
  assert 'torch' not in pins and 'tokcom-jax' not in pins


def test_wandb_goes_online_only_with_an_api_key(monkeypatch, tmp_path, caplog):
  import wandb

  from tokcom_jax.training import metrics_log
  monkeypatch.setenv('HOME', str(tmp_path))
  for name in ('WANDB_API_KEY', 'WANDB_MODE'):
    monkeypatch.delenv(name, raising=False)
  netrc = tmp_path / '.netrc'
  netrc.write_text('machine example.com login me password secret\n')
  netrc.chmod(0o600)
  assert not metrics_log._wandb_key()  # another host's login is no wandb key
  modes = []
  monkeypatch.setattr(wandb, 'init', lambda **kw: modes.append(kw['mode']) or
                      types.SimpleNamespace(finish=lambda: None))
  config = config_lib.base_config()
  config.wandb.mode = 'online'  # as configs/v52.py
  with caplog.at_level(logging.WARNING):
    metrics_log.MetricsLog(tmp_path / 'run', config, 0)
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert modes == ['offline'] and len(warnings) == 1
  assert 'wandb' in warnings[0] and 'no API key' in warnings[0]
  assert '\n' not in warnings[0]
  netrc.write_text('machine api.wandb.ai login user password 0123456789abcdef\n')
  assert metrics_log._wandb_key()
  netrc.unlink()
  monkeypatch.setenv('WANDB_API_KEY', '0123456789abcdef')
  assert metrics_log._wandb_key()


def test_the_license_file_is_mit():
  text = (REPO / 'LICENSE').read_text()
  assert text.startswith('MIT License\n\nCopyright (c) 2026 tokcom_jax authors\n')
  assert 'MIT: see `LICENSE`.' in README.read_text()
