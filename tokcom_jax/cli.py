"""Entry-point plumbing: user errors become one line on stderr and exit code 2."""

import sys

from absl import app, flags, logging

from tokcom_jax.errors import TokcomError

flags.DEFINE_bool('verbose', False, 'Show the full traceback of user errors.')


def run(main):
  """absl's app.run, with a user error printed as `error: …` and exit code 2."""
  def guarded(argv):
    # Orbax and JAX log every save at INFO; show warnings unless --verbosity is given.
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)
    try:
      return main(argv)
    except TokcomError as e:
      if flags.FLAGS.verbose:
        raise
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C; a training run says what it saved
      print(str(e) or 'interrupted', file=sys.stderr)
      sys.exit(getattr(e, 'exit_code', 130))
  app.run(guarded, flags_parser=_parse_flags)


def _parse_flags(argv):
  """absl's parsing, but a bad flag or config is one line and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    cause = e
    while cause.__cause__ is not None or cause.__context__ is not None:
      cause = cause.__cause__ or cause.__context__
    message = str(cause) if isinstance(cause, TokcomError) else str(e)
    if '--verbose' in argv:
      raise
    print(f'error: {message.strip().splitlines()[-1]}', file=sys.stderr)
    sys.exit(2)
