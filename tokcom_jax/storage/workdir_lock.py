"""One run at a time in a workdir: `<workdir>/lock` names the run that holds it.

Training and evaluation take the lock before they write anything; sampling only
reads and takes none. The lock file is JSON (host, pid, what, since when), created
with O_CREAT | O_EXCL, so of two runs that start together exactly one gets it. It
is removed when the run ends, on an error too. A lock whose run is gone (killed,
crashed, a second Ctrl-C) is taken over with a warning when it was taken on this
host and its process is no longer alive; one from another host cannot be checked,
and the message says how to remove it. On gs:// there is no O_EXCL: the lock is
checked, then written (a start at the same moment is not caught there).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import time

from etils import epath

from tokcom_jax.errors import CheckpointError
from tokcom_jax.storage.files import is_remote


LOCK_NAME = 'lock'


class WorkdirBusy(CheckpointError):
  """Another run holds the workdir."""


def _process_start(pid: int) -> str | None:
  """The start time of a process in clock ticks since boot (Linux), which tells a
  reused pid from the process that took the lock; None where unknown."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(holder: dict) -> bool:
  pid = holder.get('pid')
  if not isinstance(pid, int) or pid <= 0:
    return True  # cannot tell: treat as held
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # alive, another user's
  start = holder.get('start')
  return not (start and _process_start(pid) not in (None, start))


def describe(holder: dict | None) -> str:
  """`the training run on host h (pid 12, since …)`, for messages."""
  if holder is None:
    return 'another run (its lock file cannot be read)'
  return (f'the {holder.get("purpose") or "other"} run on host {holder.get("host")}'
          f' (pid {holder.get("pid")}, since {holder.get("since")})')


def _read(path: epath.Path) -> dict | None:
  try:
    holder = json.loads(path.read_text())
    return holder if isinstance(holder, dict) else None
  except (OSError, ValueError):
    return None


class WorkdirLock:
  """The lock of one workdir, taken by `acquire` and given back by `release`."""

  def __init__(self, workdir, purpose: str):
    self.workdir = str(workdir)
    self.path = epath.Path(workdir) / LOCK_NAME
    self.holder = {'host': socket.gethostname(), 'pid': os.getpid(),
                   'start': _process_start(os.getpid()), 'purpose': purpose,
                   'since': time.strftime('%Y-%m-%d %H:%M:%S'),
                   'token': secrets.token_hex(8)}
    self.held = False

  def _create(self) -> bool:
    """Writes the lock file if there is none; False when there is one."""
    text = json.dumps(self.holder)
    if is_remote(self.path):
      if self.path.exists():
        return False
      self.path.write_text(text)
      return True
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    try:
      with os.fdopen(fd, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:  # a full disk: no empty lock may stay behind
      self.path.unlink(missing_ok=True)
      raise CheckpointError(f'{self.workdir}: cannot write its lock {self.path}'
                            f' ({e.strerror or e}): free some space and run again.'
                            ) from e
    return True

  def _take_over(self, stale: dict) -> None:
    """Removes a stale lock, unless another run replaced it meanwhile."""
    if is_remote(self.path):
      self.path.unlink(missing_ok=True)
      return
    aside = epath.Path(f'{self.path}.stale-{os.getpid()}')
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return  # another run removed it first
    if _read(aside) != stale:  # a live run's lock: put it back
      with contextlib.suppress(OSError):
        os.link(aside, self.path)
    aside.unlink(missing_ok=True)

  def acquire(self) -> 'WorkdirLock':
    for _ in range(3):  # a stale lock taken over, then created again
      if self._create():
        self.held = True
        return self
      holder = _read(self.path)
      if (holder is None or holder.get('host') != self.holder['host']
          or _alive(holder)):
        raise WorkdirBusy(
            f'{self.workdir} is in use by {describe(holder)}: wait for it to end or'
            ' use another --workdir; if no such run is alive, delete'
            f' {self.path}.')
      logging.warning('%s: taking over the lock of %s, which is no longer running',
                      self.workdir, describe(holder))
      self._take_over(holder)
    raise WorkdirBusy(f'{self.workdir}: could not take its lock {self.path}; try'
                      ' again.')

  def release(self) -> None:
    """Removes the lock file if it is still this run's."""
    if self.held and (_read(self.path) or {}).get('token') == self.holder['token']:
      self.path.unlink(missing_ok=True)
    self.held = False


@contextlib.contextmanager
def hold(workdir, purpose: str, create: bool = True, required: bool = True):
  """The workdir's lock for the duration of a block (process 0 takes it; every
  process raises when it is busy).

  `create`: make the workdir if missing (else a missing workdir is not locked and
  the caller reports it). `required=False`: a workdir that cannot be written (a
  read-only copy of a run) is used unlocked, since no run can write there either.
  """
  import jax
  lock, busy = None, None
  if jax.process_index() == 0:
    path = epath.Path(workdir)
    try:
      if create:
        path.mkdir(parents=True, exist_ok=True)
      if path.exists():
        lock = WorkdirLock(workdir, purpose).acquire()
    except WorkdirBusy as e:
      busy = e
    except OSError:
      if required:
        raise
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    if multihost_utils.process_allgather(np.array(busy is not None)).any():
      busy = busy or WorkdirBusy(f'{workdir} is in use by another run (see process 0).')
  if busy is not None:
    raise busy
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
