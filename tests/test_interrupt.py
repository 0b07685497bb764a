"""Ctrl-C and SIGTERM save the current step and stop; resuming continues from it,
and a stopped stage 1 of `:all` never goes on to stage 2."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests import train_fixtures
from tokcom_jax.storage import checkpoint
from tokcom_jax.training import metrics_log
from tokcom_jax.training import trainer as trainer_lib


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python train.py …` with Ctrl-C's usual handler, also when the tests run as a
# background job (started with SIGINT ignored, which a run keeps ignoring).
AS_IN_A_TERMINAL = ('import runpy, signal, sys;'
                    ' signal.signal(signal.SIGINT, signal.default_int_handler);'
                    ' sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")')
# Far more steps than any test reaches: the run is always stopped by the signal.
LONG = {'train.vae.num_steps': 100000, 'eval_every': 100000, 'sample_every': 0}


def losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


def wait_for(condition, proc, what: str, timeout: float = 600):
  """Polls `condition` (file content, never elapsed time, decides); the timeout
  only bounds a run that hangs or dies."""
  deadline = time.monotonic() + timeout
  while not condition():
    if proc.poll() is not None:
      pytest.fail(f'the run ended (exit {proc.returncode}) before {what}')
    if time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f'no {what} within {timeout} s')
    time.sleep(0.05)


@pytest.mark.slow
def test_ctrl_c_saves_the_current_step_and_resume_continues_from_it(corpus, tmp_path):
  workdir = tmp_path / 'vae'
  with open(tmp_path / 'stderr.txt', 'w') as err:  # a file: a pipe could fill up
    proc = subprocess.Popen(
        [sys.executable, '-c', AS_IN_A_TERMINAL, os.path.join(REPO, 'train.py'),
         *train_fixtures.micro_flags(*corpus, **LONG), f'--workdir={workdir}'],
        stdout=subprocess.DEVNULL, stderr=err, cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS='cpu'))
    try:
      # A logged step: the loop, and its signal handlers, are running.
      wait_for(lambda: metrics_log_steps(workdir) >= 1, proc, 'a logged step')
      proc.send_signal(signal.SIGINT)
      proc.wait(timeout=600)
    finally:
      if proc.poll() is None:
        proc.kill()
  stderr = (tmp_path / 'stderr.txt').read_text()
  assert proc.returncode == 130, stderr[-3000:]
  last = stderr.strip().splitlines()[-1]
  match = re.fullmatch(r'interrupted: saved step (\d+) to (.+); run the same command'
                       r' to resume\.', last)
  assert match, stderr[-3000:]
  assert 'Traceback' not in stderr
  step = int(match.group(1))
  assert match.group(2) == f'{workdir}/checkpoints/{step}'
  assert 1 <= step < LONG['train.vae.num_steps']
  mngr = checkpoint.manager(workdir, read_only=True)
  assert mngr.latest_step() == step
  mngr.close()
  assert max(losses(workdir)) == step  # every step up to the saved one is logged
  assert not (workdir / 'lock').exists()  # released on the way out

  config = train_fixtures.micro_config(*corpus, **LONG)
  interrupted = losses(workdir)
  trainer_lib.Trainer(config, str(workdir)).run(stop_after=step + 2)
  resumed = losses(workdir)
  assert sorted(resumed) == list(range(1, step + 3))
  reference = tmp_path / 'reference'
  trainer_lib.Trainer(config, str(reference)).run(stop_after=step + 2)
  # Bit-identical to a run that was never interrupted, before and after the save.
  assert resumed == losses(reference)
  assert {s: resumed[s] for s in interrupted} == interrupted


def metrics_log_steps(workdir) -> int:
  path = workdir / 'metrics.jsonl'
  steps = [0]
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        steps.append(json.loads(line)['step'])
      except (ValueError, KeyError):
        pass  # a line being written
  return max(steps)


def test_a_preempted_stage_1_ends_all_without_starting_stage_2(corpus, tmp_path,
                                                                monkeypatch):
  """A real SIGTERM, sent by the run to itself when it logs step 3."""
  write = metrics_log.MetricsLog.write

  def write_then_preempt(self, step, metrics, extra=None):
    write(self, step, metrics, extra)
    if step == 3 and 'train/loss' in metrics:
      os.kill(os.getpid(), signal.SIGTERM)
  monkeypatch.setattr(metrics_log.MetricsLog, 'write', write_then_preempt)
  handler = signal.getsignal(signal.SIGTERM)
  config = train_fixtures.micro_config(*corpus, stage='all')
  with pytest.raises(trainer_lib.Stopped) as stopped:
    trainer_lib.train(config, str(tmp_path / 'run'))
  assert stopped.value.exit_code == 143
  assert str(stopped.value) == (f'preempted: saved step 3 to {tmp_path}/run/vae/'
                                'checkpoints/3; run the same command to resume.')
  assert sorted(os.listdir(tmp_path / 'run')) == ['vae']  # no stage 2, no lock
  assert 'lock' not in os.listdir(tmp_path / 'run' / 'vae')
  assert signal.getsignal(signal.SIGTERM) is handler
