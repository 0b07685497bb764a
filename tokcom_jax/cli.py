"""Entry-point plumbing: user errors become one line on stderr and exit code 2.

A user error is a `TokcomError` or an `OSError` (a path that is missing, a directory,
not writable; a full disk): `error: <one line>` and exit code 2. `--verbose`, or
TOKCOM_JAX_VERBOSE=1 in the environment, shows the traceback instead.
"""

import errno
import os
import sys

from absl import app, flags, logging

from tokcom_jax.errors import TokcomError

flags.DEFINE_bool('verbose', False, 'Show the full traceback of user errors (or set'
                  ' TOKCOM_JAX_VERBOSE=1).')

VERBOSE_ENV = 'TOKCOM_JAX_VERBOSE'
USER_ERRORS = (TokcomError, OSError)

# What to do about an OSError, by its errno.
_OS_HINTS = {
    errno.EACCES: 'check its permissions or choose another path',
    errno.EPERM: 'check its permissions or choose another path',
    errno.EROFS: 'the file system is read-only: choose another path',
    errno.ENOSPC: 'the disk is full: free some space or choose another path',
    errno.EDQUOT: 'the disk quota is used up: free some space or choose another path',
    errno.EISDIR: 'give a file, not a directory',
    errno.ENOTDIR: 'a part of the path is a file, not a directory: choose another path',
    errno.EEXIST: 'something is in the way: remove it or choose another path',
    errno.ENOENT: 'check the path',
}


def verbose(argv=()) -> bool:
  """Whether user errors show their traceback."""
  given = flags.FLAGS['verbose'].value if flags.FLAGS.is_parsed() else (
      '--verbose' in argv)
  return bool(given) or os.environ.get(VERBOSE_ENV, '') not in ('', '0')


def one_line(e: BaseException) -> str:
  """The line a user sees for a TokcomError or an OSError."""
  text = str(e)
  if isinstance(e, OSError) and not isinstance(e, TokcomError):
    where = ' -> '.join(str(f) for f in (e.filename, e.filename2) if f is not None)
    what = e.strerror or text or type(e).__name__
    text = f'{where}: {what}' if where else what
    if e.errno in _OS_HINTS:
      text += f' ({_OS_HINTS[e.errno]})'
  return ' '.join(line.strip() for line in text.splitlines() if line.strip())


def report(e: BaseException) -> None:
  """`error: …` on stderr, exit code 2."""
  print(f'error: {one_line(e)}', file=sys.stderr, flush=True)
  sys.exit(2)


def guard(main):
  """main, with a user error reported in one line (or raised when verbose)."""
  def guarded(argv):
    # Orbax and JAX log every save at INFO; show warnings unless --verbosity is given.
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)
    try:
      return main(argv)
    except USER_ERRORS as e:
      if verbose():
        raise
      report(e)
    except KeyboardInterrupt as e:  # Ctrl-C; a training run says what it saved
      print(str(e) or 'interrupted', file=sys.stderr)
      sys.exit(getattr(e, 'exit_code', 130))
  return guarded


def run(main):
  """absl's app.run, with a user error printed as `error: …` and exit code 2."""
  app.run(guard(main), flags_parser=_parse_flags)


def _parse_flags(argv):
  """absl's parsing, but a bad flag or config is one line and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, *USER_ERRORS) as e:
    cause = e
    while cause.__cause__ is not None or cause.__context__ is not None:
      cause = cause.__cause__ or cause.__context__
    if verbose(argv):
      raise
    if isinstance(cause, USER_ERRORS):
      report(cause)
    print(f'error: {str(e).strip().splitlines()[-1]}', file=sys.stderr, flush=True)
    sys.exit(2)
