"""benchmarks/accelerator.sh end to end in its reduced (--quick) mode on the CPU: the
train-step and sampling benchmarks and a short training run, then the Markdown."""

import json
import os
import sys

import numpy as np
import pytest

from configs import tiny
from tests import background as background_lib
from tokcom_jax import stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def accelerator_quick(scratch, corpus):
  """(the --quick run, its output directory, a run with an unknown argument)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', ACCELERATOR_OUT=str(scratch),
             # `python` is this interpreter, as after activating its environment
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
  run = lambda arg: background_lib.run(['bash', 'benchmarks/accelerator.sh', arg],
                                       cwd=REPO, env=env)
  return run('--quick'), scratch, run('--fast')


@pytest.mark.slow
@pytest.mark.background(job=accelerator_quick)
def test_accelerator_script_runs_end_to_end_on_the_cpu(background):
  out, tmp_path, bad = background(accelerator_quick)
  assert out.returncode == 0, out.stderr[-3000:]
  train = [json.loads(l) for l in open(tmp_path / 'train.jsonl') if l.startswith('{')]
  steps = [r for r in train if r['bench'] == 'train_step']
  assert {r['stage'] for r in steps} == {'vae', 'diffusion'}
  # On a CPU both the step and the peak are timed, so MFU's size varies from run to
  # run (a tiny step can outrun the matmul probe); what it is made of does not.
  (peak,) = [r['flops_per_sec_per_device'] for r in train if r['bench'] == 'peak']
  for r in steps:
    config = tiny.get_config(','.join(filter(None, [r['stage'], r['set']])))
    assert r['model_flops_per_step'] == stages.get(config, r['stage']).train_flops(
        r['batch']), r
    assert r['tokens_per_sec'] > 0 and r['mfu'] > 0, r
    np.testing.assert_allclose(r['mfu'], r['flops_per_sec'] / peak, rtol=1e-9)
    np.testing.assert_allclose(r['flops_per_sec'] * r['step_ms'] / 1e3,
                               r['model_flops_per_step'], rtol=1e-9)
  sampled = [json.loads(l) for l in open(tmp_path / 'sampling.jsonl')]
  assert sampled and all(r['tokcom_tokens_per_sec'] > 0 and
                         r['autoregressive_tokens_per_sec'] > 0 for r in sampled)
  # The Markdown: one table row per benchmark line, the smoke run's losses.
  md = out.stdout[out.stdout.index('## Accelerator run'):]
  rows = [l for l in md.splitlines() if l.startswith('| jax ')]
  assert len(rows) == len(steps), md
  smoke = [l for l in md.splitlines() if 'stage 1' in l]
  assert len(smoke) == 1, md
  first, last = float(smoke[0].split('|')[3]), float(smoke[0].split('|')[5])
  assert first > 0 and last > 0, smoke
  assert (tmp_path / 'smoke' / 'checkpoints').is_dir()
  # An unknown argument: one line, exit 2.
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
