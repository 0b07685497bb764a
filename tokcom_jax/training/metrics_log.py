"""What a run writes as it trains: metrics.jsonl, samples.jsonl and wandb (process 0).

`metrics.jsonl` holds one JSON object per logged step; `samples.jsonl` one per
end-of-epoch sample. Locally they are appended to; an object store (a gs://
workdir) has no append, so there each write replaces the whole object. wandb is
imported lazily, only by process 0 of a run that logs to it, and goes online only
with an API key.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
from typing import Any

import jax
import numpy as np
from etils import epath

from tokcom_jax.storage import files


class MetricsLog:
  """metrics.jsonl always; wandb when enabled; process 0 only."""

  def __init__(self, workdir, config, resume_step: int):
    self.workdir = epath.Path(workdir)
    self.enabled = jax.process_index() == 0
    self.path = self.workdir / 'metrics.jsonl'
    self.wandb = None
    if not self.enabled:
      return
    # Drop lines a killed run wrote after its last checkpoint.
    for path in (self.path, self.workdir / 'samples.jsonl'):
      truncate_jsonl(path, resume_step)
    mode = os.environ.get('WANDB_MODE', config.wandb.mode)
    if mode != 'disabled':
      import wandb  # lazily: only process 0 of runs that log to it
      if mode == 'online' and not _wandb_key():
        logging.warning('wandb: no API key (WANDB_API_KEY or `wandb login`),'
                        ' logging offline')
        mode = 'offline'
      self.wandb = wandb.init(project=config.wandb.project, mode=mode,
                              config=config.to_dict(), dir=str(self.workdir),
                              name=self.workdir.name, resume='allow')

  def write(self, step: int, metrics: dict[str, Any], wandb_extra=None) -> None:
    if not self.enabled:
      return
    row = {'step': step, **{k: _to_python(v) for k, v in metrics.items()}}
    _append(self.path, [row])
    if self.wandb is not None:
      self.wandb.log({**row, **(wandb_extra or {})}, step=step)

  def write_samples(self, step: int, table: str, columns, rows: list[dict]) -> None:
    """Appends sample rows to samples.jsonl; a wandb table named `table`."""
    if not self.enabled:
      return
    rows = [{'step': step, **r} for r in rows]
    _append(self.workdir / 'samples.jsonl', rows)
    if self.wandb is not None:
      import wandb
      self.wandb.log({table: wandb.Table(
          columns=list(columns), data=[[r[c] for c in columns] for r in rows])},
                     step=step)

  def close(self):
    if self.wandb is not None:
      self.wandb.finish()


def _wandb_key() -> bool:
  """An API key in the environment, or a `wandb login` entry in ~/.netrc."""
  if os.environ.get('WANDB_API_KEY'):
    return True
  try:
    return netrc.netrc().authenticators('api.wandb.ai') is not None
  except (OSError, netrc.NetrcParseError):
    return False


def _append(path: epath.Path, rows: list[dict]) -> None:
  files.append_lines(path, ''.join(json.dumps(r) + '\n' for r in rows))


def read_rows(path) -> list[dict]:
  """The rows of a JSON-lines file; lines that are not a JSON object (a torn last
  line of a killed run, a line half written while it trains) are skipped with one
  warning."""
  path = epath.Path(path)
  if not path.exists():
    return []
  rows, torn = [], 0
  for line in path.read_text().splitlines():
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      row = None
    if isinstance(row, dict):
      rows.append(row)
    else:
      torn += 1
  if torn:
    logging.warning('%s: %d line(s) that are not JSON objects skipped (a torn write).',
                    path, torn)
  return rows


def truncate_jsonl(path: epath.Path, last_step: int) -> None:
  """Keeps the rows of a JSON-lines file up to `last_step` (a torn last line goes)."""
  if not path.exists():
    return
  rows = []
  for line in path.read_text().splitlines():
    try:
      if json.loads(line)['step'] <= last_step:
        rows.append(line)
    except (json.JSONDecodeError, KeyError, TypeError):
      pass
  files.write_text(path, ''.join(l + '\n' for l in rows))


def _to_python(v):
  if isinstance(v, (np.generic, np.ndarray, jax.Array)):
    return float(v)
  return v
