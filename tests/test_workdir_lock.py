"""One run at a time per workdir: the lock file, stale locks, and a second train.py
refused while the first holds the workdir."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests import train_fixtures
from tokcom_jax import evaluate
from tokcom_jax.storage import workdir_lock
from tokcom_jax.training import trainer as trainer_lib


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dead_pid() -> int:
  """A pid no process can have: above the kernel's largest."""
  with open('/proc/sys/kernel/pid_max') as f:
    return int(f.read()) + 1


def write_lock(workdir, **holder):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'lock').write_text(json.dumps(
      {'host': socket.gethostname(), 'pid': os.getpid(), 'purpose': 'training',
       'since': '2026-01-02 03:04:05', **holder}))


def test_the_lock_names_its_holder_and_is_released_on_error(tmp_path):
  with pytest.raises(RuntimeError, match='boom'):
    with workdir_lock.hold(tmp_path / 'run', 'training'):
      holder = json.loads((tmp_path / 'run' / 'lock').read_text())
      assert holder['pid'] == os.getpid() and holder['purpose'] == 'training'
      assert holder['host'] == socket.gethostname()
      with pytest.raises(workdir_lock.WorkdirBusy) as busy:
        workdir_lock.WorkdirLock(tmp_path / 'run', 'evaluation').acquire()
      raise RuntimeError('boom')
  message = str(busy.value)
  assert '\n' not in message
  assert f'the training run on host {socket.gethostname()} (pid {os.getpid()}, since' in (
      message)
  assert f'delete {tmp_path}/run/lock' in message
  assert not (tmp_path / 'run' / 'lock').exists()


def test_a_stale_lock_of_this_host_is_taken_over_with_a_warning(tmp_path, caplog):
  write_lock(tmp_path / 'run', pid=dead_pid())
  with caplog.at_level('WARNING'):
    with workdir_lock.hold(tmp_path / 'run', 'evaluation'):
      assert json.loads((tmp_path / 'run' / 'lock').read_text())['pid'] == os.getpid()
  assert f'pid {dead_pid()}' in caplog.text and 'no longer running' in caplog.text
  assert os.listdir(tmp_path / 'run') == []  # released, nothing left aside


def test_a_reused_pid_is_told_apart_by_its_start_time(tmp_path, caplog):
  write_lock(tmp_path / 'run', start='1')  # this process, but not started then
  with caplog.at_level('WARNING'):
    with workdir_lock.hold(tmp_path / 'run', 'training'):
      pass
  assert 'no longer running' in caplog.text


@pytest.mark.parametrize('holder, named', [
    ({'host': 'elsewhere', 'pid': 1}, 'on host elsewhere (pid 1,'),  # cannot check
    ({}, f'(pid {os.getpid()},'),  # this very process: alive
    (None, 'its lock file cannot be read'),
])
def test_a_live_or_unknown_holder_is_refused(tmp_path, holder, named):
  if holder is None:
    (tmp_path / 'lock').write_text('{"host": "a", "pi')  # torn by a kill
  else:
    write_lock(tmp_path, **holder)
  before = (tmp_path / 'lock').read_text()
  with pytest.raises(workdir_lock.WorkdirBusy, match='delete') as busy:
    with workdir_lock.hold(tmp_path, 'training'):
      pass
  assert named in str(busy.value)
  assert (tmp_path / 'lock').read_text() == before  # never removed by the refused run


def test_the_object_store_path_checks_then_writes(tmp_path, monkeypatch):
  """gs:// has no O_EXCL: the same code, through epath, on a local directory."""
  monkeypatch.setattr(workdir_lock, 'is_remote', lambda path: True)
  with workdir_lock.hold(tmp_path, 'training'):
    with pytest.raises(workdir_lock.WorkdirBusy, match='training run'):
      workdir_lock.WorkdirLock(tmp_path, 'training').acquire()
  assert not (tmp_path / 'lock').exists()
  write_lock(tmp_path, pid=dead_pid())
  with workdir_lock.hold(tmp_path, 'training'):
    assert json.loads((tmp_path / 'lock').read_text())['pid'] == os.getpid()


def test_evaluate_of_a_missing_or_read_only_workdir_takes_no_lock(tmp_path,
                                                                 monkeypatch):
  with workdir_lock.hold(tmp_path / 'missing', 'evaluation', create=False):
    assert not (tmp_path / 'missing').exists()

  def read_only(path, *args, **kwargs):
    raise OSError(30, 'Read-only file system', str(path))
  monkeypatch.setattr(workdir_lock.os, 'open', read_only)
  with workdir_lock.hold(tmp_path, 'evaluation', create=False, required=False) as lock:
    assert lock is None
  with pytest.raises(OSError, match='Read-only'):
    with workdir_lock.hold(tmp_path, 'training'):
      pass


@pytest.mark.slow
def test_a_second_run_is_refused_while_the_first_holds_the_workdir(corpus, tmp_path):
  """The test process is the first run: it holds the lock for the whole test, so
  the second one (train.py, evaluate) meets it whatever the timing."""
  workdir = tmp_path / 'vae'
  with workdir_lock.hold(workdir, 'training'):
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, 'train.py'),
         *train_fixtures.micro_flags(*corpus), f'--workdir={workdir}'],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env=dict(os.environ, JAX_PLATFORMS='cpu'))
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr[-3000:]
    assert lines[0].startswith(f'error: {workdir} is in use by the training run on host'
                               f' {socket.gethostname()} (pid {os.getpid()}, since ')
    assert lines[0].endswith(f'delete {workdir}/lock.')
    with pytest.raises(workdir_lock.WorkdirBusy, match=f'pid {os.getpid()}'):
      trainer_lib.train(train_fixtures.micro_config(*corpus), str(workdir))
    with pytest.raises(workdir_lock.WorkdirBusy, match=f'pid {os.getpid()}'):
      evaluate.evaluate(str(workdir))
    # The refused runs wrote nothing and left the holder's lock in place.
    assert os.listdir(workdir) == ['lock']
    assert json.loads((workdir / 'lock').read_text())['pid'] == os.getpid()
  assert os.listdir(workdir) == []
