"""The Hugging Face hub and TensorFlow Datasets: reachability, loading, and the one-line
errors for what cannot be loaded (gated, private, offline).

Nothing here is needed offline: the embedded default (`stdlib` corpus, `bpe:` tokenizer)
never calls it.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request
from typing import Iterator

from tokcom_jax.errors import DataError


OFFLINE_HINT = ('to train offline, use `--config configs/tiny.py:all` (stdlib corpus, BPE'
                ' tokenizer, both stages) or `--config.tokenizer=bpe:8192'
                ' --config.data.source=stdlib`.')


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


def hf_documents(source: str, split: str, text_column: str) -> Iterator[str]:
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


def tfds_documents(source: str, split: str, text_column: str) -> Iterator[str]:
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataError('tfds: sources need TensorFlow Datasets: pip install'
                    ' tensorflow-datasets') from None
  ds = tfds.load(source[len('tfds:'):], split=split)
  for example in tfds.as_numpy(ds):
    text = example[text_column]
    yield text.decode('utf-8') if isinstance(text, bytes) else str(text)

