"""Whole-file writes that a crash or a kill never leaves half done.

A local file is written under a temporary name in its own directory, synced, and
renamed over the old one (`os.replace` is atomic), so readers see the old file or
the new one, never a torn one. A symlink is followed: its target is what gets
replaced, the link stays. What is not a regular file (a device such as /dev/stdout
or /dev/full, a named pipe, a socket) is written in place, as a shell's `>` would:
replacing it would break it (and a reader waiting on a pipe would wait forever). An
object store (gs://…) makes an object visible only when its upload completes, so a
remote file is written directly.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import stat
from typing import BinaryIO, Iterator

from etils import epath



def is_remote(path) -> bool:
  """gs://… and other URLs: reached through etils.epath, not the local filesystem."""
  return '://' in str(path)


@contextlib.contextmanager
def atomic_open(path) -> Iterator[BinaryIO]:
  """A binary file to write whole; it replaces `path` when the block ends without
  an error, and nothing changes when it raises."""
  if is_remote(path):
    buffer = io.BytesIO()
    yield buffer  # uploaded only when the block succeeds
    epath.Path(path).write_bytes(buffer.getvalue())
    return
  path = os.path.realpath(os.fspath(path))  # a symlink's target, not the link
  try:
    special = not stat.S_ISREG(os.stat(path).st_mode)
  except FileNotFoundError:
    special = False
  if special:  # a device, pipe or socket: written in place, never replaced
    with open(path, 'wb') as f:
      yield f
    return
  directory, name = os.path.split(path)
  tmp = os.path.join(directory, f'.{name}.{secrets.token_hex(4)}.tmp')
  # os.open with 0o666 (less the umask): the file gets the permissions a plain
  # open() would give it, not tempfile's owner-only 0o600.
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, 'wb') as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def write_bytes(path, data: bytes) -> None:
  with atomic_open(path) as f:
    f.write(data)


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


def write_figure(fig, path) -> str:
  """A matplotlib figure as a PNG at `path` (its directory made if missing)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100)
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  write_bytes(path, buffer.getvalue())
  return str(path)


def append_lines(path, text: str) -> None:
  """Appends to a text file; an object store has no append, so a remote file is
  read, extended and written again as a new object."""
  path = epath.Path(path)
  if is_remote(path):
    old = path.read_text() if path.exists() else ''
    write_text(path, old + text)
    return
  with path.open('a') as f:
    f.write(text)
