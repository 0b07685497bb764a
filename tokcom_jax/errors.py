"""Every error a user can cause, under one base class: the bottom of the import graph.

Entry points (`train.py`, `sample.py`, `python -m tokcom_jax.…`) turn a `TokcomError`
into one line on stderr and exit code 2 (`tokcom_jax.cli`); the message says what to do.
"""


class TokcomError(Exception):
  """A user-caused problem; its message is one line that says what to change."""


class ConfigError(TokcomError, ValueError):
  """A config or flag that cannot run."""


class DataError(TokcomError, ValueError):
  """Input data (corpus, tokenizer, source) that cannot be used."""


class CheckpointError(TokcomError, RuntimeError):
  """A checkpoint or run directory that is missing or cannot be used."""


class TrainingError(TokcomError, RuntimeError):
  """The run cannot go on (non-finite losses, a missing stage-1 run)."""


class SamplingError(TokcomError, ValueError):
  """A generation or evaluation request that cannot be served."""
