"""Runs that can be moved: paths relative to the run, the stage-1 checkpoint a
stage-2 run was trained on (step + fingerprint), a wrong VAE refused, old runs
still loading; evaluate on a read-only run; checkpoint errors in one line."""

import errno
import glob
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import tokcom_jax
from tokcom_jax import config_lib, evaluate
from tokcom_jax import stages
from tokcom_jax.errors import CheckpointError
from tokcom_jax.storage import checkpoint, orbax_reports, portable
from tokcom_jax.training import sharding
from tokcom_jax.training import train_state
from tokcom_jax.training import trainer as trainer_lib


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_runs(runs, dst: pathlib.Path) -> pathlib.Path:
  """The two runs of the `runs` fixture, as `cp -r runs/ dst` would copy them."""
  root = pathlib.Path(runs[1]).parent
  for name in ('vae', 'diffusion'):
    shutil.copytree(root / name, dst / name,
                    ignore=shutil.ignore_patterns('lock', 'eval*', 'plots'))
  return dst


@pytest.fixture(scope='module')
def moved(runs, tmp_path_factory):
  """The runs copied, then moved: where they were copied to no longer exists."""
  first = copy_runs(runs, tmp_path_factory.mktemp('first') / 'runs')
  moved = tmp_path_factory.mktemp('moved') / 'runs'
  shutil.move(first, moved)
  assert not first.exists()
  return moved


def vae_step(runs) -> int:
  return checkpoint.read_meta(runs[1])[1]['frozen']['vae']['step']


def other_vae(runs, workdir, step: int):
  """A VAE of the same shapes, seed 1 and untrained, saved as step `step`."""
  config = config_lib.from_dict(checkpoint.read_meta(runs[0])[1]['config'])
  config.seed = 1
  trainer = trainer_lib.Trainer(config, str(workdir))
  trainer._save(step)
  trainer.ckpt.wait_until_finished()
  trainer.ckpt.close()


@pytest.fixture(scope='module')
def wrong(runs, tmp_path_factory):
  """A copy of the runs whose vae/ holds another VAE at the recorded step."""
  root = copy_runs(runs, tmp_path_factory.mktemp('wrong') / 'runs')
  shutil.rmtree(root / 'vae')
  other_vae(runs, root / 'vae', vae_step(runs))
  return root


def test_a_stage2_run_records_its_vae_by_relative_path_step_and_fingerprint(runs):
  vae_dir, dit_dir = runs
  _, meta = checkpoint.read_meta(dit_dir)
  step, vae_meta = checkpoint.read_meta(vae_dir)
  assert meta['tokenizer_dir'] == 'tokenizer'
  assert meta['frozen']['vae'] == {
      'path': '../vae', 'absolute': vae_dir, 'step': step,
      'fingerprint': vae_meta['fingerprints']['params']}
  # Its own copy of the VAE's tokenizer, byte for byte.
  for name in os.listdir(os.path.join(vae_dir, 'tokenizer')):
    assert open(os.path.join(dit_dir, 'tokenizer', name), 'rb').read() == open(
        os.path.join(vae_dir, 'tokenizer', name), 'rb').read()


def test_a_moved_run_samples_and_evaluates(runs, moved):
  model = tokcom_jax.load(str(moved / 'diffusion'))
  assert model.vae_workdir == str(moved / 'vae')  # found beside it, not where it was
  original = tokcom_jax.load(runs[1])
  assert model.generate(2, steps=3) == original.generate(2, steps=3)
  result = evaluate.evaluate(str(moved / 'diffusion'), num_samples=3, steps=2,
                             num_windows=8, batch_size=4)
  assert json.load(open(moved / 'diffusion' / 'eval.json')) == result
  assert sorted(result['plots']) == [str(moved / 'diffusion' / 'plots' / f) for f in (
      'decodability.png', 'diffusion_loss.png', 'vae_loss.png')]
  assert result['recon_token_accuracy'] > 0.5  # the trained VAE, not a stranger


def test_a_wrong_vae_is_refused_and_vae_workdir_points_at_the_right_one(runs, wrong):
  with pytest.raises(CheckpointError) as refused:
    tokcom_jax.load(str(wrong / 'diffusion'))
  message = str(refused.value)
  assert message.startswith(f'{wrong}/vae step {vae_step(runs)} is not the vae'
                            f' {wrong}/diffusion was trained on (parameter fingerprint')
  assert message.endswith('pass --vae_workdir=<the vae run it was trained on>.')
  model = tokcom_jax.load(str(wrong / 'diffusion'), vae_workdir=runs[0])
  assert model.generate(1, steps=2) == tokcom_jax.load(runs[1]).generate(1, steps=2)
  # A VAE run without the recorded step at all.
  with pytest.raises(CheckpointError, match=rf'it has no step {vae_step(runs)} \(it'
                     r' has \[3\]\)'):
    other_vae(runs, wrong / 'short', 3)
    tokcom_jax.load(runs[1], vae_workdir=str(wrong / 'short'))


@pytest.mark.slow
def test_the_cli_refuses_a_wrong_vae_in_one_line_and_takes_vae_workdir(runs, wrong):
  cli = lambda *args: subprocess.run(
      [sys.executable, os.path.join(REPO, 'sample.py'),
       f'--workdir={wrong}/diffusion', '--steps=2', '--num_samples=1', *args],
      capture_output=True, text=True, cwd=REPO, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  refused = cli()
  assert refused.returncode == 2, refused.stderr[-3000:]
  assert refused.stderr.strip().splitlines() == [
      f'error: {wrong}/vae step {vae_step(runs)} is not the vae {wrong}/diffusion was'
      f' trained on (parameter fingerprint {fingerprint(wrong / "vae")}, recorded'
      f' {fingerprint(runs[0])}); pass --vae_workdir=<the vae run it was trained on>.']
  ok = cli(f'--vae_workdir={runs[0]}')
  assert ok.returncode == 0, ok.stderr[-3000:]


def fingerprint(vae_dir) -> int:
  return checkpoint.read_meta(str(vae_dir))[1]['fingerprints']['params']


def test_a_resumed_stage2_run_refuses_a_changed_vae(runs, wrong):
  config = config_lib.from_dict(checkpoint.read_meta(runs[1])[1]['config'])
  config.vae_workdir = str(wrong / 'vae')
  with pytest.raises(CheckpointError, match=(
      rf'trained on vae step {vae_step(runs)} \(fingerprint {fingerprint(runs[0])}\),'
      rf' but {wrong}/vae now gives step {vae_step(runs)} \(fingerprint'
      rf' {fingerprint(wrong / "vae")}\)')):
    trainer_lib.Trainer(config, str(wrong / 'diffusion')).run()


def test_runs_written_before_fingerprints_still_load(runs, moved, tmp_path, monkeypatch,
                                                    caplog):
  """Old metas held absolute paths and no fingerprint: used as they are, or the
  run beside a moved one, with a warning that nothing could be checked."""
  read_meta = checkpoint.read_meta
  gone = '/gone/runs'

  def old_meta(workdir, step=None):
    step, meta = read_meta(workdir, step)
    if meta['stage'] == 'diffusion':
      meta = {**meta, 'frozen': {'vae': f'{gone}/vae'},
              'tokenizer_dir': f'{gone}/vae/tokenizer'}
    return step, meta
  monkeypatch.setattr(checkpoint, 'read_meta', old_meta)
  shutil.rmtree(moved / 'diffusion' / 'tokenizer')  # old runs had none of their own
  with caplog.at_level('WARNING'):
    model = tokcom_jax.load(str(moved / 'diffusion'))
  assert model.vae_workdir == str(moved / 'vae')
  assert 'records no fingerprint of its vae' in caplog.text
  assert model.generate(1, steps=2) == tokcom_jax.load(runs[1]).generate(1, steps=2)
  # The oldest: `vae_workdir` instead of `frozen`.
  assert portable.find_frozen('x', {'vae_workdir': runs[0]}, 'vae')[0] == runs[0]
  with pytest.raises(CheckpointError) as missing:
    portable.find_frozen(str(tmp_path / 'diffusion'), {'frozen': {'vae': '/gone/vae'}},
                         'vae')
  assert str(missing.value) == (
      f'the vae run that {tmp_path}/diffusion was trained on is not at /gone/vae nor'
      f' {tmp_path}/vae: pass --vae_workdir=<where it is now>.')


def test_evaluate_on_a_read_only_run_returns_its_results_and_names_what_it_could_not(
    runs, tmp_path, monkeypatch, caplog):
  root = copy_runs(runs, tmp_path / 'runs')
  before = sorted(glob.glob(f'{root}/**', recursive=True))
  run = str(root / 'diffusion')
  real_open, real_mkdir = os.open, os.mkdir

  def refuse_inside(real):
    def call(path, *args, **kwargs):
      if str(path).startswith(run):
        raise OSError(errno.EROFS, 'Read-only file system', str(path))
      return real(path, *args, **kwargs)
    return call
  monkeypatch.setattr(os, 'open', refuse_inside(real_open))
  monkeypatch.setattr(os, 'mkdir', refuse_inside(real_mkdir))
  with caplog.at_level('WARNING'):
    result = evaluate.evaluate(run, num_samples=3, steps=2, num_windows=8, batch_size=4)
  assert result['recon_token_accuracy'] > 0.5 and result['plots'] == []
  warnings = [r.getMessage() for r in caplog.records if 'could not write' in
              r.getMessage()]
  assert warnings == [
      'could not write plots/vae_loss.png, plots/diffusion_loss.png,'
      f' plots/decodability.png, eval.json, eval_samples.jsonl in {run} (Read-only'
      ' file system): the results are printed only.']
  assert sorted(glob.glob(f'{root}/**', recursive=True)) == before


def test_a_changed_model_config_is_named_before_anything_is_read(runs):
  config = config_lib.from_dict(checkpoint.read_meta(runs[0])[1]['config'])
  config.vae.latent_dim = 8
  mesh = sharding.make_mesh(-1, 1)
  _, abstract = train_state.abstract_params(
      stages.get(config, 'vae').build, mesh)
  with pytest.raises(CheckpointError, match=r'step \d+: it holds params/from_latent/'
                     r'kernel of shape \(16, 64\), this config builds \(8, 64\)\. If'):
    checkpoint.restore_params(runs[0], abstract)


@pytest.mark.slow
def test_a_damaged_checkpoint_is_one_line_without_orbax_noise(runs, tmp_path):
  """Every checkpoint damaged: orbax's abandoned reads used to print hundreds of
  "Event loop is closed" / "Task exception was never retrieved" tracebacks."""
  vae = tmp_path / 'vae'
  shutil.copytree(runs[0], vae)
  for step in os.listdir(vae / 'checkpoints'):
    # Every data file: which of them hold the params (the only part a
    # reconstruction reads) depends on how orbax's writer threads were scheduled.
    data = glob.glob(str(vae / 'checkpoints' / step / 'state' / '**' / 'd' / '*'),
                     recursive=True)
    assert data
    for path in data:
      with open(path, 'r+b') as f:
        f.truncate(min(100, os.path.getsize(path) // 2))
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, 'sample.py'), f'--workdir={vae}',
       '--mode=reconstruct', '--input_text=x = 1'],
      capture_output=True, text=True, cwd=REPO, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f'error: no checkpoint in {vae}/checkpoints can be read'), out.stderr[-3000:]
  assert np.all([s not in out.stderr for s in ('Traceback', 'Event loop')])


def test_abandoned_orbax_reads_report_nothing_else_still_does():
  """A failed restore leaves reads whose errors asyncio reports when they are
  collected: "Task ...", "_GatheringFuture ..." (whose text names no file: only its
  traceback shows where it came from) or "Future exception was never retrieved" (an
  error tensorstore set from C++: no traceback, but its text names the file).
  Those from orbax or about the checkpoints being read are dropped; any other is
  still reported."""
  import asyncio
  import gc
  import logging

  def reports_of(filename, path):
    scope = {}
    exec(compile('async def read():\n  raise ValueError("OUT_OF_RANGE")\n', filename,
                 'exec'), scope)

    async def leave_unretrieved():
      task = asyncio.ensure_future(scope['read']())
      gathered = asyncio.gather(scope['read'](), scope['read']())
      future = asyncio.get_running_loop().create_future()
      future.set_exception(ValueError(f'OUT_OF_RANGE: Error reading "x" in OCDBT'
                                      f' database at local file "{path}/8/state/"'))
      await asyncio.sleep(0.01)
      return task, gathered, future

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger('asyncio')
    logger.addHandler(handler)
    loop = asyncio.new_event_loop()
    try:
      futures = loop.run_until_complete(leave_unretrieved())
      loop.close()
      del futures
      gc.collect()
    finally:
      logger.removeHandler(handler)
    return sorted(r.getMessage().split('\n')[0] for r in records)

  orbax_reports.quiet_leftovers('/runs/vae/checkpoints')
  assert reports_of('/venv/site-packages/orbax/checkpoint/fake.py',
                    '/runs/vae/checkpoints') == []
  assert reports_of('/venv/site-packages/other/fake.py', '/elsewhere') == [
      'Future exception was never retrieved',
      'Task exception was never retrieved',
      '_GatheringFuture exception was never retrieved']


@pytest.mark.parametrize('frozen, run, relative', [
    ('/data/runs/vae', '/data/runs/diffusion', '../vae'),
    ('/data/runs/tiny/vae', '/data/runs/tiny', 'vae'),
    ('gs://bucket/runs/vae', 'gs://bucket/runs/diffusion', '../vae'),
    ('gs://other/runs/vae', 'gs://bucket/runs/diffusion', 'gs://other/runs/vae'),
    ('gs://bucket/runs/vae', '/data/runs/diffusion', 'gs://bucket/runs/vae'),
])
def test_relative_paths_on_disks_and_buckets(frozen, run, relative):
  assert portable.relative(frozen, run) == relative
  assert portable.join(run, relative) == frozen  # object stores do not resolve `..`
