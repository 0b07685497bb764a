"""The token cache and deterministic batches.

Documents are joined with EOS into one token stream, cached once per (source, split,
tokenizer) as a flat `.npy` that is memory-mapped, and cut into windows of
`max_length` tokens. Batch s is a pure function of (seed, s) and of nothing else.
Where documents come from: `tokcom_jax.data.sources`; tokenizers: `tokcom_jax.data.tokenizer`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import pathlib
from typing import Iterable

import numpy as np
from tqdm import tqdm

from tokcom_jax.data.sources import cache_root, fingerprint, iter_documents
from tokcom_jax.data.tokenizer import tokenizer_fingerprint
from tokcom_jax.errors import DataError
from tokcom_jax.storage import files


def cache_path(cache_dir, source: str, split: str, tokenizer) -> pathlib.Path:
  """One file per (source's files, split, tokenizer): a changed corpus or tokenizer
  gets a new cache, never a stale one."""
  key = hashlib.sha256(
      f'{fingerprint(source)}|{split}|{tokenizer_fingerprint(tokenizer)}'.encode())
  safe = ''.join(c if c.isalnum() else '_' for c in source)[:40]
  return pathlib.Path(cache_dir) / f'{safe}-{split}-{key.hexdigest()[:16]}.npy'


def tokenize_to_stream(texts: Iterable[str], tokenizer, batch: int = 256,
                       desc: str = 'tokenizing') -> np.ndarray:
  """Every document's tokens followed by EOS, as one flat array."""
  dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
  eos = tokenizer.eos_token_id
  pieces, pending = [], []

  def flush():
    for ids in tokenizer(pending, add_special_tokens=False)['input_ids']:
      pieces.append(np.asarray(ids + [eos], dtype))
    pending.clear()

  for text in tqdm(texts, desc=desc, unit=' docs', leave=False,
                   disable=not _show_progress()):
    pending.append(text)
    if len(pending) == batch:
      flush()
  if pending:
    flush()
  return np.concatenate(pieces) if pieces else np.zeros((0,), dtype)


def load_token_stream(source: str, split: str, tokenizer, cache_dir=None,
                      text_column: str = 'text', hf_split: str | None = None
                      ) -> np.ndarray:
  """The split's token stream, from the cache (memory-mapped) or built once.

  The cache file is written to a temporary name and renamed into place, so a crash
  or a kill never leaves a partial cache behind; one damaged later (truncated, cut
  short by a full disk, overwritten) is found on open and built again.
  """
  path = cache_path(cache_dir or cache_root(), source, split, tokenizer)
  problem = cache_problem(path) if path.exists() else 'missing'
  if problem != 'missing' and problem is not None:
    logging.warning('token cache %s is damaged (%s): building it again', path, problem)
  if problem is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = tokenize_to_stream(
        iter_documents(source, split, text_column, hf_split), tokenizer,
        desc=f'tokenizing {source} {split}')
    with files.atomic_open(path) as f:
      np.save(f, stream)
    logging.info('cached %d %s tokens in %s', stream.size, split, path)
  return np.load(path, mmap_mode='r')


def cache_problem(path: pathlib.Path) -> str | None:
  """Why a token cache cannot be used, or None: its header must parse as a flat
  array of uint16/uint32 tokens and the file must be exactly as long as it says."""
  readers = {(1, 0): np.lib.format.read_array_header_1_0,
             (2, 0): np.lib.format.read_array_header_2_0}
  try:
    with open(path, 'rb') as f:
      version = np.lib.format.read_magic(f)
      if version not in readers:
        return f'unknown .npy version {version}'
      shape, _, dtype = readers[version](f)
      header = f.tell()
  except (OSError, ValueError) as e:
    return f'unreadable header: {e}'
  if len(shape) != 1 or dtype not in (np.uint16, np.uint32):
    return f'holds {dtype} {list(shape)}, not a token stream'
  expected, size = header + shape[0] * dtype.itemsize, path.stat().st_size
  if size != expected:
    return f'{size} bytes, its header says {expected}'
  return None


def _show_progress() -> bool:
  import jax
  return jax.process_index() == 0


# ---------------------------------------------------------------------------- batches


class Windows:
  """A token stream cut into non-overlapping windows of `length` tokens."""

  def __init__(self, stream: np.ndarray, length: int):
    self.stream = stream
    self.length = length
    self.num_windows = stream.shape[0] // length

  def get(self, indices: np.ndarray) -> np.ndarray:
    """Windows [len(indices), length] as int32 (only those rows are read)."""
    starts = np.asarray(indices, np.int64)[:, None] * self.length
    return np.asarray(self.stream[starts + np.arange(self.length)], np.int32)


def train_indices(step: int, seed: int, num_windows: int, global_batch: int
                  ) -> np.ndarray:
  """Window indices of global batch `step`: a fresh permutation every epoch.

  A pure function of (seed, step): the same on every process and after a resume.
  """
  steps_per_epoch = num_windows // global_batch
  epoch, offset = divmod(step, steps_per_epoch)
  order = _epoch_order(seed, epoch, num_windows)
  return order[offset * global_batch:(offset + 1) * global_batch]


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, num_windows: int) -> np.ndarray:
  """One permutation per epoch, computed once rather than at every step."""
  order = np.random.default_rng([seed, epoch]).permutation(num_windows)
  order.flags.writeable = False
  return order


def eval_indices(batch: int, num_windows: int, global_batch: int) -> np.ndarray:
  """The validation windows of eval batch `batch`, in order (wrapping around)."""
  return np.arange(batch * global_batch, (batch + 1) * global_batch) % num_windows


def eval_batch_count(requested: int, num_windows: int, global_batch: int) -> int:
  """`train.eval_batches`, clamped to the batches the validation windows fill (more
  would score the same windows again), with one warning when it is."""
  available = max(1, -(-num_windows // global_batch))
  if requested > available and (requested, available) not in _CLAMPED:
    _CLAMPED.add((requested, available))
    logging.warning('train.eval_batches=%d is more than the %d batches of %d'
                    ' validation windows: evaluating %d.', requested, available,
                    num_windows, available)
  return min(requested, available)


_CLAMPED: set[tuple[int, int]] = set()


def steps_per_epoch(num_windows: int, global_batch: int) -> int:
  return num_windows // global_batch


def check_enough(windows: Windows, global_batch: int, split: str, source: str):
  if split == 'train' and windows.num_windows < global_batch:
    raise DataError(
        f'the {split} split of {source!r} has {windows.num_windows} windows of'
        f' {windows.length} tokens, fewer than one batch of {global_batch}: use more'
        ' text or a smaller --config.train.batch_size / --config.max_length.')
  if windows.num_windows == 0:
    raise DataError(f'the {split} split of {source!r} is shorter than one window of'
                    f' {windows.length} tokens: use more text.')


def load_splits(config, tokenizer, global_batch: int) -> tuple[Windows, Windows]:
  """(train, validation) windows of `config.max_length` tokens, checked to be big
  enough for a batch."""
  c = config
  windows = []
  for split, hf_split in (('train', c.data.train_split),
                          ('validation', c.data.val_split)):
    stream = load_token_stream(c.data.source, split, tokenizer, c.data.cache_dir or None,
                               c.data.text_column, hf_split)
    w = Windows(stream, c.max_length)
    check_enough(w, global_batch, split, c.data.source)
    windows.append(w)
  logging.info('data: %d train / %d validation windows of %d tokens',
               windows[0].num_windows, windows[1].num_windows, c.max_length)
  return windows[0], windows[1]
