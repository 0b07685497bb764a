"""Text sources: where a corpus's documents come from, and which are held out.

Sources (`config.data.source`):
  stdlib              the running Python's standard-library sources (no network)
  files:<glob>        your own UTF-8 text files
  hf:<path>[:<name>]  a Hugging Face dataset, e.g. hf:wikitext:wikitext-2-raw-v1
  tfds:<name>         a TensorFlow Datasets dataset (needs tensorflow-datasets)

For `stdlib` and `files:` about 2% of the files are validation, chosen by a hash of
each file's path relative to the corpus root, so the split is the same wherever the
corpus lives.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import logging
import os
import pathlib
import sysconfig
from typing import Iterable, Iterator

from tokcom_jax.data import hub
from tokcom_jax.errors import DataError


VAL_PER_MILLE = 20  # documents hashed into [0, 20) of 1000 are validation (2%)


def _hash(name: str) -> int:
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], 'little')


def validation_names(names: list[str]) -> set[str]:
  """About 2% of the documents, chosen by a hash of their names; at least one."""
  chosen = {n for n in names if _hash(n) % 1000 < VAL_PER_MILLE}
  if not chosen and len(names) > 1:
    chosen = {min(names, key=_hash)}
  return chosen


def stdlib_files() -> list[pathlib.Path]:
  """The standard library's .py files, without site-packages and test suites."""
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  skip = {'site-packages', 'dist-packages', 'test', 'tests', 'idle_test'}
  return sorted(p for p in root.rglob('*.py')
                if not skip & set(p.relative_to(root).parts))


def glob_root(pattern: str) -> pathlib.Path:
  """The directories of a glob before its first wildcard: `/data/py/**/*.py` →
  `/data/py`. Files are named relative to it, so that the validation split does not
  depend on where the corpus lives."""
  parts = pathlib.PurePath(pattern).parts
  fixed = []
  for part in parts[:-1]:
    if globlib.has_magic(part):
      break
    fixed.append(part)
  return pathlib.Path(*fixed) if fixed else pathlib.Path('.')


def _read_files(paths: Iterable[pathlib.Path], root: pathlib.Path, split: str
                ) -> Iterator[str]:
  # Names relative to the corpus root (a POSIX path): the split is the same on any
  # machine and wherever the corpus is copied.
  named = [(p.relative_to(root).as_posix(), p) for p in paths]
  validation = validation_names([name for name, _ in named])
  for name, path in named:
    if (name in validation) != (split == 'validation'):
      continue
    try:
      yield path.read_text(encoding='utf-8')
    except UnicodeDecodeError:
      logging.warning('skipping %s: not UTF-8 text', path)


def _files(source: str) -> tuple[pathlib.Path, list[pathlib.Path]]:
  """(corpus root, sorted files) of a `files:<glob>` source."""
  pattern = os.path.expanduser(source[len('files:'):])
  paths = sorted(pathlib.Path(p) for p in globlib.glob(pattern, recursive=True)
                 if os.path.isfile(p))
  if not paths:
    raise DataError(f'data source {source!r} matches no files: check the glob'
                    ' (quote it so the shell does not expand it).')
  return glob_root(pattern), paths


def fingerprint(source: str) -> str:
  """What a source's documents depend on, for cache keys: for `stdlib` and
  `files:`, every file's name (relative to the corpus root), size and modification
  time, so that a changed, added or removed file makes new caches; for hub sources,
  their name."""
  if source == 'stdlib':
    root, paths = pathlib.Path(sysconfig.get_paths()['stdlib']), stdlib_files()
  elif source.startswith('files:'):
    root, paths = _files(source)
  else:
    return source
  digest = hashlib.sha256()
  for path in paths:
    stat = path.stat()
    digest.update(f'{path.relative_to(root).as_posix()}|{stat.st_size}|'
                  f'{stat.st_mtime_ns}\n'.encode())
  return f'{source}|{digest.hexdigest()[:16]}'


def cache_root() -> pathlib.Path:
  """Where token caches and trained tokenizers live: $TOKCOM_JAX_CACHE, else
  ~/.cache/tokcom_jax."""
  return pathlib.Path(os.environ.get(
      'TOKCOM_JAX_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'tokcom_jax')))


def iter_documents(source: str, split: str, text_column: str = 'text',
                   hf_split: str | None = None) -> Iterator[str]:
  """The documents of `split` ('train' or 'validation') of a source."""
  if source == 'stdlib':
    root = pathlib.Path(sysconfig.get_paths()['stdlib'])
    yield from _read_files(stdlib_files(), root, split)
  elif source.startswith('files:'):
    root, paths = _files(source)
    yield from _read_files(paths, root, split)
  elif source.startswith('hf:'):
    yield from hub.hf_documents(source, hf_split or split, text_column)
  elif source.startswith('tfds:'):
    yield from hub.tfds_documents(source, hf_split or split, text_column)
  else:
    raise DataError(f"unknown data source {source!r}: use 'stdlib', 'files:<glob>',"
                    " 'hf:<path>[:<name>]' or 'tfds:<name>'.")
