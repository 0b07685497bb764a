"""Entry-point plumbing: every flag's declared range, and user errors as one line on
stderr with exit code 2.

`TRAIN_FLAGS`, `SAMPLE_FLAGS`, `EVALUATE_FLAGS`, … give each flag of the entry points
a rule of `tokcom_jax.config_checks` (a test fails while a flag has none), checked by
the same loop as the config's fields; the `check_*` functions add what flags must
agree on, and what a trained run limits:

    --top_p=1.5: must be a number in (0, 1] (pass --top_p=P)
    --input_file=notes/: is a directory (give a file)

A user error is a `TokcomError` or an `OSError` (a path that is missing, a directory,
not writable; a full disk): `error: <one line>` and exit code 2. `--verbose`, or
TOKCOM_JAX_VERBOSE=1 in the environment, shows the traceback instead.
"""

import errno
import os
import sys
from typing import Any

import numpy as np
from absl import app, flags, logging

from tokcom_jax import config_lib
from tokcom_jax.config_checks import (ANY, COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_INT,
                                      PROBABILITY, SEED, Rule, check_flags,
                                      directory_problem, rule)
from tokcom_jax.errors import ConfigError, SamplingError, TokcomError
from tokcom_jax.storage.files import is_remote

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


PATH_FLAGS = ('workdir', 'vae_workdir', 'reference', 'input_file', 'output_file')


def _expand_paths() -> None:
  """`~` in a path flag means the home directory, as in a shell (which leaves
  `--workdir=~/x` as it is); an empty path is refused rather than read as '.'."""
  for name in PATH_FLAGS:
    if name in flags.FLAGS and isinstance(flags.FLAGS[name].value, str):
      if not flags.FLAGS[name].value.strip():
        raise ConfigError(f'--{name} is empty: give a path, or leave the flag out.')
      flags.FLAGS[name].value = os.path.expanduser(flags.FLAGS[name].value)


def _parse_flags(argv):
  """absl's parsing, but a bad flag or config is one line and exit code 2."""
  try:
    for path in config_lib.config_files(argv[1:]):
      config_lib.check_config_file(os.path.expanduser(path))
    parsed = flags.FLAGS(argv)
    _expand_paths()
    return parsed
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


# ------------------------------------------------------------------ flag ranges


def _run(path: str) -> str | None:
  """A run directory that train.py wrote."""
  if is_remote(path):
    return None
  if not os.path.exists(path):
    return 'does not exist (give a run directory that train.py wrote)'
  if not os.path.isdir(path):
    return 'is a file, not a run directory (give a directory that train.py wrote)'
  return None


def _input_file(path: str) -> str | None:
  if is_remote(path):
    return None
  if not os.path.exists(path):
    return 'does not exist (check the path)'
  if os.path.isdir(path):
    return 'is a directory (give a file)'
  if not os.access(path, os.R_OK):
    return 'cannot be read (check its permissions)'
  return None


def _output_file(path: str) -> str | None:
  """A file that can be written, checked before the work that produces it (a
  symlink's target; a device or pipe is written in place: storage.files)."""
  if is_remote(path):
    return None
  path = os.path.realpath(path)
  if os.path.isdir(path):
    return 'is a directory (give a file name)'
  if os.path.exists(path) and not os.path.isfile(path):  # a device, pipe, socket
    return None if os.access(path, os.W_OK) else 'is not writable (choose another path)'
  parent = os.path.dirname(path)
  if not os.path.isdir(parent):
    return f'its directory {parent} does not exist (create it or choose another path)'
  if not os.access(parent, os.W_OK | os.X_OK):
    return f'its directory {parent} is not writable (choose another path)'
  return None


WORKDIR = Rule(lambda v: directory_problem('--workdir', v), None)
RUN_DIR = Rule(_run, None)
INPUT_FILE = Rule(_input_file, None)
OUTPUT_FILE = Rule(_output_file, None)


TRAIN_FLAGS = {
    'config': ANY,  # its fields: CONFIG
    'workdir': WORKDIR,
    'coordinator_address': rule(lambda v: v.rpartition(':')[2].isdigit()
                                and v.rpartition(':')[0] != '', 'HOST:PORT',
                                'localhost:1234'),
    'num_processes': POSITIVE_INT,
    'process_id': COUNT,
}
SAMPLE_FLAGS = {
    'workdir': RUN_DIR,
    'mode': ANY,  # an enum: absl checks it
    'steps': POSITIVE_INT,
    'num_samples': POSITIVE_INT,
    'batch_size': POSITIVE_INT,
    'num_chunks': POSITIVE_INT,  # at most the run's max_length / chunk_size
    'num_tokens': POSITIVE_INT,  # at most what fits in the run's context
    'prompt': ANY,
    'input_text': ANY,
    'input_file': INPUT_FILE,
    'output_file': OUTPUT_FILE,
    'seed': SEED,
    'temperature': NON_NEGATIVE,  # 0: argmax
    'top_k': COUNT,  # 0: every token; at most the run's vocabulary
    'top_p': PROBABILITY,
    'noise_scale': POSITIVE,
    'vae_workdir': RUN_DIR,  # where stage 1 is, when not where the run recorded it
}
EVALUATE_FLAGS = {
    'workdir': RUN_DIR,
    'reference': RUN_DIR,
    'num_samples': POSITIVE_INT,
    'steps': POSITIVE_INT,
    'num_windows': POSITIVE_INT,
    'batch_size': POSITIVE_INT,
    'seed': SEED,
    'noise_scale': POSITIVE,
    'vae_workdir': RUN_DIR,
}
RESILIENCE_FLAGS = {'kills': COUNT, 'seed': SEED,
                    'root': Rule(lambda v: directory_problem('--root', v), None)}


def check_train_flags(values: dict[str, Any]) -> None:
  check_flags(values, TRAIN_FLAGS)
  given = [n for n in ('num_processes', 'process_id') if values.get(n) is not None]
  if values.get('coordinator_address') and len(given) < 2:
    raise ConfigError('--coordinator_address needs --num_processes and --process_id'
                      ' too (pass all three on every process).')
  if given and not values.get('coordinator_address'):
    raise ConfigError(f'--{given[0]} needs --coordinator_address=HOST:PORT of process 0'
                      ' (on a TPU pod pass none of the three).')
  if len(given) == 2 and values['process_id'] >= values['num_processes']:
    raise ConfigError(f'--process_id={values["process_id"]}: must be below'
                      f' --num_processes={values["num_processes"]} (pass 0 to'
                      f' {values["num_processes"] - 1}).')


def check_sample_flags(values: dict[str, Any]) -> None:
  """sample.py's flags: their ranges, and the input each --mode needs."""
  check_flags(values, SAMPLE_FLAGS)
  mode, text, path = values['mode'], values.get('input_text'), values.get('input_file')
  if mode == 'generate':
    if text is not None or path:
      raise ConfigError('--mode generate reads no --input_text or --input_file: pass'
                        ' --prompt for the start of the samples, or --mode reconstruct,'
                        ' encode or decode.')
    return
  if values.get('prompt') is not None:
    raise ConfigError(f'--prompt is for --mode generate; --mode {mode} reads'
                      ' --input_text or --input_file.')
  if mode == 'decode':
    if not (path or '').endswith('.npy') or text is not None:
      raise ConfigError('--mode decode reads latents: pass --input_file=LATENTS.npy'
                        ' (written by --mode encode --output_file=LATENTS.npy).')
  elif (text is None) == (not path):
    raise ConfigError(f'--mode {mode} needs --input_text or --input_file (one of them;'
                      f' got {"both" if path else "neither"}).')
  elif mode == 'encode' and values.get('output_file') and not values[
      'output_file'].endswith('.npy'):
    raise ConfigError(f'--output_file={values["output_file"]}: --mode encode writes'
                      ' latents to a .npy file (pass --output_file=LATENTS.npy).')


# Flags that only one kind of run reads: given to the other kind, they are refused
# rather than silently ignored.
TOKCOM_ONLY = ('steps', 'noise_scale', 'num_chunks', 'vae_workdir')
AR_ONLY = ('num_tokens',)


def check_flags_apply(values: dict[str, Any], stage: str, workdir: str) -> None:
  """Refuses a flag given (not None) that the run at `workdir` (of `stage`) ignores."""
  unused = [f for f in (TOKCOM_ONLY if stage == 'ar' else AR_ONLY)
            if values.get(f) is not None]
  if unused:
    kind = 'an autoregressive (ar) run' if stage == 'ar' else 'a TokCom run'
    fix = ('--num_tokens for its length' if stage == 'ar'
           else '--num_chunks for its length')
    raise ConfigError(f'--{unused[0]}={values[unused[0]]}: {workdir} is {kind}, which'
                      f' does not use it (leave it out; {fix}).')


def check_sampling_for_run(values: dict[str, Any], config, workdir: str) -> None:
  """Sampling flags whose limits are the trained run's (config: its config)."""
  check_flags_apply(values, config.stage, workdir)
  top_k, V = values.get('top_k') or 0, config.vocab_size
  if top_k > V:
    raise ConfigError(f'--top_k={top_k}: must be at most the {V} tokens of the'
                      f' vocabulary of {workdir} (pass --top_k=0 to keep every token).')
  N = config.max_length // config.chunk_size
  if config.stage != 'ar' and (values.get('num_chunks') or 0) > N:
    raise ConfigError(f'--num_chunks={values["num_chunks"]}: must be between 1 and {N},'
                      f' the chunks {workdir} was trained on (pass --num_chunks={N}).')


def check_latents(z, path: str, latent_dim: int | None = None) -> None:
  """Latents read from `path` for decoding: a finite float array [N, latent_dim]."""
  width = latent_dim or 'Z'
  if (z.ndim != 2 or not np.issubdtype(z.dtype, np.floating) or z.shape[0] == 0
      or z.shape[1] != (latent_dim or z.shape[1])):
    raise SamplingError(f'--input_file={path}: latents must be a float array'
                        f' [N, {width}]; got {z.dtype} {list(z.shape)} (N >= 1; write'
                        ' them with this run: --mode encode --output_file=LATENTS.npy).')
  bad = int(np.size(z) - np.isfinite(z).sum())
  if bad:
    raise SamplingError(f'--input_file={path}: {bad} of {z.size} values are NaN or'
                        ' inf (decode needs finite latents; encode the text again).')
