"""Runs that need a fresh JAX: several CPU devices, several processes (gloo).

Every test here starts processes (`slow`)."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import background as background_lib
from tests import train_fixtures
from tokcom_jax.storage import checkpoint
from tokcom_jax.training import train_state
from tokcom_jax.training import trainer as trainer_lib


pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, 'train.py')


def losses(workdir, key='train/loss'):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r[key] for r in rows if key in r}


def assert_same_losses(a, b):
  assert sorted(a) == sorted(b)
  np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)],
                             rtol=1e-5)


def multi_device_runs(scratch, corpus):
  """(1 process of 4 CPU devices on a 2x2 (data x fsdp) mesh, then 2 processes of 2
  devices each on the same mesh, on a localhost coordinator): each run's workdir and
  what its processes gave, through train.py."""
  flags = train_fixtures.micro_flags(*corpus, **{'mesh.fsdp': 2})
  four = str(scratch / 'four' / 'vae')
  env = lambda devices: dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices),
                             JAX_PLATFORMS='cpu')
  four_out = background_lib.run([sys.executable, TRAIN, f'--workdir={four}', *flags],
                                cwd=REPO, env=env(4))
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  two = str(scratch / 'two')
  two_outs = background_lib.run_together(
      [[sys.executable, TRAIN, f'--workdir={two}', *flags,
        f'--coordinator_address=localhost:{port}', '--num_processes=2',
        f'--process_id={i}'] for i in range(2)], cwd=REPO, env=env(2), timeout=300)
  return (four, four_out), (two, two_outs)


@pytest.fixture
def four_device_run(background):
  (four, out), _ = background(multi_device_runs)
  assert out.returncode == 0, out.stderr[-3000:]
  return four


@pytest.mark.background(job=multi_device_runs)
def test_four_devices_match_one(vae_run, four_device_run):
  assert_same_losses(losses(four_device_run), losses(vae_run))


@pytest.mark.background(job=multi_device_runs)
def test_two_processes_match_one_process_and_share_checkpoints(
    corpus, vae_run, four_device_run, background):
  """2 processes of 2 devices (a 2x2 mesh) from scratch: the losses of one process on
  one device and of four devices, the parameters of four devices, and a checkpoint
  that 1 process on 1 device reads."""
  config = train_fixtures.micro_config(*corpus)
  _, (two, procs) = background(multi_device_runs)
  for p in procs:
    assert p.returncode == 0, p.stderr[-3000:]
  outs = [(p.stdout, p.stderr) for p in procs]
  assert_same_losses(losses(two), losses(four_device_run))
  assert_same_losses(losses(two), losses(vae_run))
  assert len(open(os.path.join(two, 'metrics.jsonl')).readlines()) == 8 + 2
  assert 'vae:' in outs[0][1] and 'vae:' not in outs[1][1]  # one progress bar

  # Written by 2 processes on a 2x2 mesh, read by 1 process on 1 device.
  trainer = trainer_lib.Trainer(config, two)
  assert trainer._restore() == 8  # fingerprints checked on the way in
  graphdef, abstract = train_state.abstract_params(trainer.stage.build, trainer.mesh)
  four, _, _ = checkpoint.restore_params(four_device_run, abstract, step=8)
  # Parameters are ~0.02 in size; reduction order moves a few by ~1e-6.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               trainer.state['params'], four)


def memory_report(scratch, corpus):
  """The memory report on 8 fake CPU devices: (8 data), (8 fsdp), (2 data x 4 fsdp)."""
  return background_lib.run(
      [sys.executable, '-m', 'tokcom_jax.memory',
       f'--config={os.path.join(REPO, "configs", "tiny.py")}:diffusion',
       # The tiny widths, one layer per stack: the same shardings, a quarter of the
       # graph to compile.
       '--config.dit.num_layers=1', '--config.vae.encoder_layers=1',
       '--config.vae.decoder_layers=1', '--mesh=8x1,1x8,2x4'], cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))


@pytest.mark.background(job=memory_report)
def test_fsdp_divides_state_bytes_per_device(background):
  out = background(memory_report)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = {r['mesh']: r for r in map(json.loads, out.stdout.splitlines())}
  state = {m: r['params_bytes'] + r['optimizer_bytes'] for m, r in rows.items()}
  # Only vectors (norm scales, biases) and scalars stay replicated.
  assert 7.0 < state['8x1'] / state['1x8'] <= 8.0
  assert 3.5 < state['8x1'] / state['2x4'] <= 4.0
  assert 3.5 < rows['8x1']['frozen_vae_bytes'] / rows['2x4']['frozen_vae_bytes'] <= 4
  # The compiled step's arguments are that state (+ the frozen VAE and the batch).
  for r in rows.values():
    assert r['argument_bytes'] >= r['params_bytes'] + r['optimizer_bytes']
    assert r['temp_bytes'] > 0


def sigkill_resume(scratch, corpus):
  flags = train_fixtures.micro_flags(*corpus, **{
      'train.vae.num_steps': 24, 'checkpoint_every': 3, 'eval_every': 6})
  return background_lib.run(
      [sys.executable, '-m', 'tokcom_jax.resilience', '--kills=3',
       f'--root={scratch}', '--', *flags], cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))


@pytest.mark.background(job=sigkill_resume)
def test_sigkill_at_random_steps_then_resume_is_bit_identical(background):
  out = background(sigkill_resume)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  landed = [k for k in report['kills'] if k['exit'] == -9]
  assert len(landed) >= 2 and all(0 < k['killed_at'] < 24 for k in landed)
  assert report['losses_identical'] and report['losses_compared'] > 24
  assert report['params_identical'] and report['final_step'] == [24, 24]


def test_a_run_samples_while_it_trains(corpus, tmp_path):
  """An `ar` run training in another process, saving a checkpoint every step and
  deleting old ones: 20 loads and samples in a row, each must succeed."""
  import time

  import tokcom_jax
  workdir = tmp_path / 'ar'
  flags = train_fixtures.micro_flags(*corpus, stage='ar', **{
      'train.ar.num_steps': 100_000, 'checkpoint_every': 1, 'eval_every': 3,
      'keep_checkpoints': 2})
  proc = subprocess.Popen([sys.executable, TRAIN, f'--workdir={workdir}', *flags],
                          cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    steps_dir = workdir / 'checkpoints'
    steps_seen = []
    for _ in range(20):
      # Each read starts once a new checkpoint has been written, while others are.
      deadline = time.monotonic() + 300
      while not any(int(p.name) > max(steps_seen, default=-1)
                    for p in steps_dir.glob('[0-9]*') if p.name.isdigit()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, 'no new checkpoint in 300 s'
        time.sleep(0.05)
      model = tokcom_jax.load(str(workdir))  # its best step, not always the newest
      steps_seen.append(max(int(p.name) for p in steps_dir.glob('[0-9]*')
                            if p.name.isdigit()))
      assert len(model.generate(1, num_tokens=4, seed=len(steps_seen), prompt='x')[0]) > 1
    assert proc.poll() is None  # it trained through every read
  finally:
    proc.kill()
    proc.wait()
