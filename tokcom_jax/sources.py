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

import functools
import glob as globlib
import hashlib
import logging
import os
import pathlib
import sysconfig
import urllib.error
import urllib.request
from typing import Iterable, Iterator

from tokcom_jax.errors import DataError

VAL_PER_MILLE = 20  # documents hashed into [0, 20) of 1000 are validation (2%)
OFFLINE_HINT = ('to train offline, use `--config configs/tiny.py:all` (stdlib corpus, BPE'
                ' tokenizer, both stages) or `--config.tokenizer=bpe:8192'
                ' --config.data.source=stdlib`.')


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
    yield from _hf_documents(source, hf_split or split, text_column)
  elif source.startswith('tfds:'):
    yield from _tfds_documents(source, hf_split or split, text_column)
  else:
    raise DataError(f"unknown data source {source!r}: use 'stdlib', 'files:<glob>',"
                    " 'hf:<path>[:<name>]' or 'tfds:<name>'.")


def hub_endpoint() -> str:
  return os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
  """Whether the Hugging Face hub answers an HTTP HEAD (through HTTPS_PROXY or
  HTTP_PROXY when set, which urllib honours like the hub client); when it does not,
  hub loads use the local cache only, instead of retrying for a minute."""
  if os.environ.get('HF_HUB_OFFLINE', '0') not in ('0', ''):
    return False
  try:  # a new opener reads the proxy variables now (urlopen's reads them once)
    urllib.request.build_opener().open(
        urllib.request.Request(hub_endpoint(), method='HEAD'), timeout=timeout).close()
  except urllib.error.HTTPError as e:  # an answer; 5xx may be a proxy's gateway error
    return e.code < 500
  except (OSError, ValueError):  # no route, refused tunnel, timeout, bad HF_ENDPOINT
    return False
  return True


def hub_error(kind: str, name: str, error: Exception, *denied_types) -> DataError:
  """The one-line error for a hub `kind` ('tokenizer' or 'dataset') that failed to
  load: a gated or private repository (the hub said 401, 403 or "not found", or the
  error is one of `denied_types`) needs a login and its licence accepted; for
  anything else, what to do offline."""
  from huggingface_hub import errors
  chain, e = [], error
  while e is not None and e not in chain:
    chain.append(e)
    e = e.__cause__ or e.__context__
  denied = any(
      isinstance(e, (errors.RepositoryNotFoundError, *denied_types))
      or getattr(getattr(e, 'response', None), 'status_code', None) in (401, 403)
      for e in chain)
  what = f'cannot load {kind} {name!r} ({type(error).__name__})'
  if denied:
    page = f'{hub_endpoint()}/{"datasets/" if kind == "dataset" else ""}{name}'
    return DataError(f'{what}: the hub refused it, so it is gated or private (or the'
                     f' name is wrong): accept its licence at {page} and log in with'
                     ' `hf auth login` (`huggingface-cli login` with an older'
                     ' huggingface_hub; or set HF_TOKEN);'
                     f' {OFFLINE_HINT}')
  if not hub_reachable():
    return DataError(f'{what}: the hub ({hub_endpoint()}) cannot be reached (behind a'
                     ' proxy, set HTTPS_PROXY; or HF_HUB_OFFLINE is set) and it is not'
                     f' in the local cache; {OFFLINE_HINT}')
  return DataError(f'{what}: --verbose shows why; {OFFLINE_HINT}')


def _hf_documents(source: str, split: str, text_column: str) -> Iterator[str]:
  if not hub_reachable():
    os.environ['HF_HUB_OFFLINE'] = os.environ['HF_DATASETS_OFFLINE'] = '1'
  import datasets  # heavy; only when used
  if not hub_reachable():  # in case datasets was imported before the lines above
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
  path, _, name = source[len('hf:'):].partition(':')
  try:
    ds = datasets.load_dataset(path, name or None, split=split)
  except Exception as e:  # the hub raises many types; all mean "cannot load"
    # datasets turns a gated repository into DatasetNotFoundError, cause dropped.
    raise hub_error('dataset', path, e, datasets.exceptions.DatasetNotFoundError
                    ) from e
  if text_column not in ds.column_names:
    raise DataError(f'dataset {path!r} has no column {text_column!r} (it has'
                    f' {ds.column_names}): set --config.data.text_column.')
  for text in ds[text_column]:
    if text:
      yield text


def _tfds_documents(source: str, split: str, text_column: str) -> Iterator[str]:
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataError('tfds: sources need TensorFlow Datasets: pip install'
                    ' tensorflow-datasets') from None
  ds = tfds.load(source[len('tfds:'):], split=split)
  for example in tfds.as_numpy(ds):
    text = example[text_column]
    yield text.decode('utf-8') if isinstance(text, bytes) else str(text)


def is_remote(path) -> bool:
  """gs://… and other URLs: reached through etils.epath, not the local filesystem."""
  return '://' in str(path)
