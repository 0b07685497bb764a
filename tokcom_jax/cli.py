"""Entry-point plumbing: user errors become one line on stderr and exit code 2."""

import sys

from absl import app, flags, logging

from tokcom_jax.checkpoint import CheckpointError
from tokcom_jax.config_lib import ConfigError
from tokcom_jax.data import DataError

flags.DEFINE_bool('verbose', False, 'Show the full traceback of user errors.')

USER_ERRORS = (ConfigError, DataError, CheckpointError)


def _user_errors():
  from tokcom_jax.sampling import SamplingError
  from tokcom_jax.train_lib import TrainingError
  return USER_ERRORS + (TrainingError, SamplingError)


def run(main):
  """absl's app.run, with a user error printed as `error: …` and exit code 2."""
  def guarded(argv):
    # Orbax and JAX log every save at INFO; show warnings unless --verbosity is given.
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)
    try:
      return main(argv)
    except _user_errors() as e:
      if flags.FLAGS.verbose:
        raise
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
  app.run(guarded)
