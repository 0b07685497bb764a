"""Orbax's leftover reports after a failed restore: a restore that fails part-way
abandons reads that orbax's coroutines and tensorstore's futures then report from
other threads ("Event loop is closed", "… exception was never retrieved"), long
after the failure was handled. `quiet_leftovers` drops those reports, and only
those. A failed background save is logged by orbax's threads, traceback and all,
before `checkpoint.save` reports it in one line: `quiet_failed_saves` drops those
logs."""

from __future__ import annotations

import logging
import sys

_READ_DIRS: set[str] = set()  # checkpoint directories restores have read


def quiet_leftovers(directory) -> None:
  """Drops what the abandoned reads of a failed restore report later (see
  `checkpoint._check_shapes`): "Event loop is closed" and "... exception was never
  retrieved" from orbax's coroutines or about files in `directory`. Anything else
  is reported as before."""
  _READ_DIRS.add(str(directory))
  previous = sys.unraisablehook
  if getattr(previous, 'tokcom_quiet', False):
    return

  def from_orbax(report) -> bool:
    code = getattr(report.object, 'cr_code', None)
    return 'Event loop is closed' in str(report.exc_value) or (
        code is not None and 'orbax' in code.co_filename)

  hook = lambda report: None if from_orbax(report) else previous(report)
  hook.tokcom_quiet = True
  sys.unraisablehook = hook
  logging.getLogger('asyncio').addFilter(lambda record: not _from_orbax(record))


def _from_orbax(record: logging.LogRecord) -> bool:
  """An asyncio report ("Task exception was never retrieved", "_GatheringFuture
  exception was never retrieved", ...) of an error raised in orbax's reads: its text
  names orbax or a checkpoint directory being read (tensorstore's errors name the
  file; set on a future from C++, they have no Python traceback), or its traceback
  passes through orbax."""
  message = record.getMessage()  # any asyncio report ("Exception in callback", …)
  if 'orbax' in message or any(d in message for d in _READ_DIRS):
    return True
  error, seen = (record.exc_info[1] if record.exc_info else None), set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    frame = error.__traceback__
    while frame is not None:
      if 'orbax' in frame.tb_frame.f_code.co_filename:
        return True
      frame = frame.tb_next
    error = error.__cause__ or error.__context__
  return False


def quiet_failed_saves() -> None:
  """Drops orbax's error logs (its background threads' reports of a failed save,
  which `checkpoint.save` raises as one line)."""
  logger = logging.getLogger('absl')
  if not any(getattr(f, 'tokcom_quiet', False) for f in logger.filters):
    drop = lambda record: not (record.levelno >= logging.ERROR
                               and 'orbax' in record.pathname)
    drop.tokcom_quiet = True
    logger.addFilter(drop)
