"""How a run refers to what it needs, so that a copied or moved run still loads.

A run keeps its own tokenizer (`<workdir>/tokenizer/`; a stage-2 run keeps a copy
of its VAE's). A stage-2 run records, in its checkpoint meta, the stage-1 run it
read frozen: its path relative to the stage-2 run (`../vae` after `:all`), the
absolute path it had, and which checkpoint it was (step, and the fingerprint of
its parameters). A loader looks for it relative to the run, then at the absolute
path (or where `--vae_workdir` says), and refuses a VAE that is not that one.
"""

from __future__ import annotations

import logging
import os
import posixpath
import urllib.parse

from etils import epath

from tokcom_jax.errors import CheckpointError
from tokcom_jax.storage import checkpoint
from tokcom_jax.storage.files import is_remote


def absolute(path) -> str:
  path = str(path)
  return path if is_remote(path) else os.path.abspath(path)


def relative(path, start) -> str:
  """`path` relative to `start` (`../vae`); `path` itself when they are on
  different filesystems or buckets."""
  path, start = absolute(path), absolute(start)
  a, b = urllib.parse.urlsplit(path), urllib.parse.urlsplit(start)
  if (a.scheme, a.netloc) != (b.scheme, b.netloc):
    return path
  return posixpath.relpath(a.path, b.path) if a.scheme else os.path.relpath(path, start)


def join(workdir, path: str) -> str:
  """`path` resolved against `workdir` (object stores do not resolve `..`)."""
  if is_remote(path) or os.path.isabs(path):
    return path
  parts = urllib.parse.urlsplit(str(workdir))
  if parts.scheme:
    return parts._replace(path=posixpath.normpath(posixpath.join(parts.path, path))
                          ).geturl()
  return os.path.normpath(os.path.join(str(workdir), path))


def record(workdir, frozen_workdir, step: int, fingerprint: int | None) -> dict:
  """What a run writes about a frozen run it was trained against."""
  return {'path': relative(frozen_workdir, workdir), 'absolute': absolute(frozen_workdir),
          'step': step, 'fingerprint': fingerprint}


def find_frozen(workdir, meta: dict, name: str, override: str | None = None
                ) -> tuple[str, dict]:
  """(where the frozen run `name` of a run is now, what the run recorded of it)."""
  found = (meta.get('frozen') or {}).get(name) or meta.get(f'{name}_workdir')
  if not found and not override:
    raise CheckpointError(f'{workdir} records no {name} run: pass --{name}_workdir.')
  found = {'absolute': found} if isinstance(found, str) else (found or {})
  if override:
    candidates = [override]
  elif 'path' in found:
    candidates = [join(workdir, found['path']), found['absolute']]
  else:  # written before relative paths: the absolute one, or a sibling of the run
    candidates = [found['absolute'], join(workdir, posixpath.join(
        '..', posixpath.basename(found['absolute'].rstrip('/'))))]
  for candidate in candidates:
    if checkpoint.checkpoint_dir(candidate).exists():
      return candidate, found
  raise CheckpointError(
      f'the {name} run that {workdir} was trained on is not at'
      f' {" nor ".join(dict.fromkeys(candidates))}: pass --{name}_workdir=<where it'
      ' is now>.')


def restore_frozen(workdir, name: str, frozen_workdir: str, found: dict,
                   abstract_params):
  """The parameters of the checkpoint of `frozen_workdir` that `workdir` recorded
  (step and fingerprint); a CheckpointError when it holds another one."""
  step, expected = found.get('step'), found.get('fingerprint')
  hint = f'pass --{name}_workdir=<the {name} run it was trained on>.'
  if step is not None:
    mngr = checkpoint.manager(frozen_workdir, read_only=True)
    steps = mngr.all_steps()
    mngr.close()
    if step not in steps:
      raise CheckpointError(
          f'{frozen_workdir} is not the {name} run {workdir} was trained on: it has'
          f' no step {step} (it has {sorted(steps)}); {hint}')
  params, meta, step = checkpoint.restore_params(frozen_workdir, abstract_params, step)
  fingerprint = (meta.get('fingerprints') or {}).get('params')
  if expected is None:
    logging.warning('%s records no fingerprint of its %s: %s step %d is used'
                    ' unchecked', workdir, name, frozen_workdir, step)
  elif fingerprint != expected:
    raise CheckpointError(
        f'{frozen_workdir} step {step} is not the {name} {workdir} was trained on'
        f' (parameter fingerprint {fingerprint}, recorded {expected}); {hint}')
  return params


def check_resume(restored_meta: dict, meta: dict) -> None:
  """A resumed run reads the same frozen models as the part before it."""
  for name, now in meta.get('frozen', {}).items():
    before = (restored_meta.get('frozen') or {}).get(name)
    if isinstance(before, dict) and before.get('fingerprint') not in (
        None, now['fingerprint']):
      raise CheckpointError(
          f'this run was trained on {name} step {before["step"]} (fingerprint'
          f' {before["fingerprint"]}), but {now["absolute"]} now gives step'
          f' {now["step"]} (fingerprint {now["fingerprint"]}): set'
          f' --config.{name}_workdir to the run it was trained on, or use a new'
          ' --workdir.')


def tokenizer_dir(workdir, meta: dict, *others: str) -> str:
  """Where a run's tokenizer is: as recorded (relative to the run, or an absolute
  path in runs written before), else in the run or in the `others` runs."""
  recorded = meta.get('tokenizer_dir', 'tokenizer')
  candidates = [join(workdir, recorded), join(workdir, 'tokenizer')] + [
      join(other, 'tokenizer') for other in others]
  candidates = list(dict.fromkeys(candidates))
  for candidate in candidates:
    if (epath.Path(candidate) / 'tokenizer_config.json').exists():
      return candidate
  raise CheckpointError(f'the tokenizer of {workdir} is missing from'
                        f' {" and ".join(candidates)}: copy the whole run, its'
                        ' tokenizer/ included.')
