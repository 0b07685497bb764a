"""A full disk: a failed checkpoint save stops training with one line, leaves no
partial checkpoint and no lock, and the same command resumes once there is room.
orbax's failure is simulated (its exception type and a partial directory); a real
full tmpfs gave the same line (benchmarks/RESULTS.md)."""

import os

import jax.numpy as jnp
import pytest

from tests import train_fixtures
from tokcom_jax.errors import CheckpointError
from tokcom_jax.storage import checkpoint, workdir_lock



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


@pytest.mark.slow
def test_training_whose_save_fails_stops_in_one_line_then_resumes(corpus, tmp_path,
                                                                   monkeypatch):
  """A micro run whose checkpoint of step 6 cannot be written (what orbax raises on a
  full disk, a partial directory left): one line, the partial directory and the lock
  gone, steps 3 kept; the same run once there is room resumes from step 3 to the end."""
  import orbax.checkpoint as ocp
  from tokcom_jax.training import trainer
  config = train_fixtures.micro_config(*corpus, stage='ar', **{
      'train.ar.num_steps': 12, 'checkpoint_every': 3, 'eval_every': 6})
  workdir = tmp_path / 'ar'
  real_save = ocp.CheckpointManager.save

  def full_at_6(self, step, *args, **kwargs):
    if step == 6:
      (workdir / 'checkpoints' / '6.orbax-checkpoint-tmp-1').mkdir()
      raise ValueError('RESOURCE_EXHAUSTED: Failed writing: No space left on device'
                       " [os_error_code='28']")
    return real_save(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, 'save', full_at_6)
  with pytest.raises(CheckpointError) as failed:
    trainer.train(config, str(workdir))
  message = str(failed.value)
  assert '\n' not in message and message.startswith(
      f'saving checkpoint step 6 to {workdir}/checkpoints failed: the disk is full (')
  assert message.endswith('it resumes from step 3.')
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['3']
  assert not (workdir / 'lock').exists()
  monkeypatch.setattr(ocp.CheckpointManager, 'save', real_save)  # room again
  trainer.train(config, str(workdir))
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir())
  assert steps[-1] == 12 and 6 in steps
