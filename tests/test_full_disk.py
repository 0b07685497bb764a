"""A full disk: a failed checkpoint save stops training with one line, leaves no
partial checkpoint and no lock, and the same command resumes once there is room.
The real thing on a small tmpfs where this machine lets a test mount one; the
same failure simulated everywhere."""

import contextlib
import os
import shutil
import subprocess
import sys
import uuid

import jax.numpy as jnp
import pytest

from tests import train_fixtures
from tokcom_jax.errors import CheckpointError
from tokcom_jax.storage import checkpoint, workdir_lock


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_failed_save_is_one_line_and_leaves_no_partial_checkpoint(tmp_path,
                                                                    monkeypatch):
  mngr = checkpoint.manager(tmp_path)
  state = {'params': {'w': jnp.ones((4,))}}
  checkpoint.save(mngr, 1, state, {}, force=True)
  checkpoint.finish(mngr)

  def full(step, *args, **kwargs):  # what orbax raises on ENOSPC, a partial dir left
    (tmp_path / 'checkpoints' / f'{step}.orbax-checkpoint-tmp-7').mkdir()
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "params.w/0": No space left'
                     " on device [os_error_code='28']")
  monkeypatch.setattr(mngr, 'save', full)
  with pytest.raises(CheckpointError) as failed:
    checkpoint.save(mngr, 2, state, {}, force=True)
  message = str(failed.value)
  assert '\n' not in message
  assert f'saving checkpoint step 2 to {tmp_path}/checkpoints failed: the disk is full' in (
      message)
  assert 'MiB free there' in message and 'it resumes from step 1.' in message
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['1']


def test_a_lock_that_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
  def no_room(fd):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(os, 'fsync', no_room)
  with pytest.raises(CheckpointError, match=r'cannot write its lock .* \(No space left on'
                     ' device'):
    workdir_lock.WorkdirLock(tmp_path, 'training').acquire()
  assert not (tmp_path / 'lock').exists()


@contextlib.contextmanager
def tmpfs(size: str):
  """A tmpfs of `size` mounted for the block; skips the test where it cannot be."""
  where = f'/tmp/tokcom-full-{uuid.uuid4().hex[:8]}'
  os.makedirs(where)
  mount = shutil.which('mount')
  if mount is None or subprocess.run([mount, '-t', 'tmpfs', '-o', f'size={size}',
                                      'tmpfs', where], capture_output=True).returncode:
    os.rmdir(where)
    pytest.skip('this machine does not let a test mount a tmpfs')
  try:
    yield where
  finally:
    subprocess.run(['umount', where], check=True)
    os.rmdir(where)


@pytest.mark.slow
def test_training_on_a_full_disk_stops_in_one_line_then_resumes(corpus):
  """A micro run whose third checkpoint does not fit; then the same command on a
  larger disk resumes from the last finished checkpoint and ends."""
  flags = train_fixtures.micro_flags(*corpus, stage='ar', **{
      'train.ar.num_steps': 12, 'checkpoint_every': 3, 'eval_every': 6})
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  with tmpfs('64m') as disk:
    workdir = os.path.join(disk, 'ar')
    run = lambda: subprocess.run([sys.executable, 'train.py', f'--workdir={workdir}',
                                  *flags], capture_output=True, text=True, cwd=REPO,
                                 env=env)
    # Fill the disk so that two checkpoints fit and the third does not.
    out = run()
    assert out.returncode == 0, out.stderr[-2000:]
    ckpt = os.path.join(workdir, 'checkpoints')
    one = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
              os.walk(os.path.join(ckpt, '12')) for f in fs)
    shutil.rmtree(workdir)
    free = shutil.disk_usage(disk).free
    with open(os.path.join(disk, 'filler'), 'wb') as f:
      f.write(b'\0' * max(0, free - int(2.5 * one) - 64 * 1024))
    out = run()
    assert out.returncode != 0
    errors = [l for l in out.stderr.splitlines() if 'error' in l.lower()]
    assert len(errors) == 1 and 'the disk is full' in errors[0], out.stderr[-3000:]
    assert 'Traceback' not in out.stderr
    finished = sorted(int(p) for p in os.listdir(ckpt))  # digits only: no partial
    assert finished and finished[-1] < 12
    assert f'it resumes from step {finished[-1]}.' in errors[0]
    assert not os.path.exists(os.path.join(workdir, 'lock'))
    os.remove(os.path.join(disk, 'filler'))
    out = run()
    assert out.returncode == 0, out.stderr[-2000:]
    assert 12 in [int(p) for p in os.listdir(ckpt)]
