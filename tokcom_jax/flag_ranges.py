"""Declared ranges of every flag of the entry points, checked before any work starts.

`TRAIN_FLAGS`, `SAMPLE_FLAGS`, `EVALUATE_FLAGS`, … give each flag a rule of
`tokcom_jax.ranges` (a test fails while a flag has none); the `check_*` functions add
what flags must agree on, and what a trained run limits. A value out of range is a
`ConfigError` of one line that names the flag, the value, what is allowed and how to
fix it:

    --top_p=1.5: must be a number in (0, 1] (pass --top_p=P)
    --input_file=notes/: is a directory (give a file)
"""

from __future__ import annotations

import os
from typing import Any

from tokcom_jax.errors import ConfigError, SamplingError
from tokcom_jax.ranges import (ANY, COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_INT,
                               PROBABILITY, Rule, directory_problem, is_remote, rule)


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
  """A file that can be written, checked before the work that produces it."""
  if is_remote(path):
    return None
  if os.path.isdir(path):
    return 'is a directory (give a file name)'
  parent = os.path.dirname(os.path.abspath(path))
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
    'seed': COUNT,
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
    'seed': COUNT,
    'noise_scale': POSITIVE,
    'vae_workdir': RUN_DIR,
}
RESILIENCE_FLAGS = {'kills': COUNT, 'seed': COUNT,
                    'root': Rule(lambda v: directory_problem('--root', v), None)}


def check_flags(values: dict[str, Any], rules: dict[str, Rule]) -> None:
  """The flags in `rules` (absent or None: not given) against their rules."""
  for name, r in rules.items():
    value = values.get(name)
    if value is None:
      continue
    problem = r.problem(value)
    if problem:
      fix = f' (pass --{name}={r.example})' if r.example else ''
      raise ConfigError(f'--{name}={value}: {problem}{fix}')


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


def check_sampling_for_run(values: dict[str, Any], config, workdir: str) -> None:
  """Sampling flags whose limits are the trained run's (config: its config)."""
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
  import numpy as np
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
