"""Text sources, tokenizers, the token cache and deterministic batches.

Sources (`config.data.source`):
  stdlib              the running Python's standard-library sources (no network)
  files:<glob>        your own UTF-8 text files
  hf:<path>[:<name>]  a Hugging Face dataset, e.g. hf:wikitext:wikitext-2-raw-v1
  tfds:<name>         a TensorFlow Datasets dataset (needs tensorflow-datasets)

Documents are joined with EOS into one token stream, cached once per (source, split,
tokenizer) as a flat `.npy` that is memory-mapped, and cut into windows of
`max_length` tokens. Batch s is a pure function of (seed, s) and of nothing else.
"""

from __future__ import annotations

import functools
import glob as globlib
import hashlib
import logging
import os
import pathlib
import socket
import sysconfig
import tempfile
import urllib.parse
from typing import Callable, Iterable, Iterator

import numpy as np
from etils import epath
from tqdm import tqdm

from tokcom_jax.errors import ConfigError, DataError

EOS = '<|endoftext|>'
PAD = '<pad>'
VAL_PER_MILLE = 20  # documents hashed into [0, 20) of 1000 are validation (2%)
OFFLINE_HINT = ('if the hub cannot be reached, run offline with'
                ' `--config configs/tiny.py` (stdlib corpus, BPE tokenizer) or'
                ' `--config.tokenizer=bpe:8192 --config.data.source=stdlib`.')


# ----------------------------------------------------------------------------- sources


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


def iter_documents(source: str, split: str, text_column: str = 'text',
                   hf_split: str | None = None) -> Iterator[str]:
  """The documents of `split` ('train' or 'validation') of a source."""
  if source == 'stdlib':
    root = pathlib.Path(sysconfig.get_paths()['stdlib'])
    yield from _read_files(stdlib_files(), root, split)
  elif source.startswith('files:'):
    pattern = os.path.expanduser(source[len('files:'):])
    paths = sorted(pathlib.Path(p) for p in globlib.glob(pattern, recursive=True)
                   if os.path.isfile(p))
    if not paths:
      raise DataError(f'data source {source!r} matches no files: check the glob'
                      ' (quote it so the shell does not expand it).')
    yield from _read_files(paths, glob_root(pattern), split)
  elif source.startswith('hf:'):
    yield from _hf_documents(source, hf_split or split, text_column)
  elif source.startswith('tfds:'):
    yield from _tfds_documents(source, hf_split or split, text_column)
  else:
    raise DataError(f"unknown data source {source!r}: use 'stdlib', 'files:<glob>',"
                    " 'hf:<path>[:<name>]' or 'tfds:<name>'.")


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
  """Whether the Hugging Face hub answers; when it does not, hub loads use the local
  cache only, instead of retrying for a minute before failing."""
  if os.environ.get('HF_HUB_OFFLINE', '0') not in ('0', ''):
    return False
  endpoint = os.environ.get('HF_ENDPOINT', 'https://huggingface.co')
  host = urllib.parse.urlparse(endpoint).hostname or 'huggingface.co'
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return True
  except OSError:
    return False


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
    raise DataError(f'cannot load dataset {path!r} ({type(e).__name__}):'
                    f' {OFFLINE_HINT}') from e
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


# -------------------------------------------------------------------------- tokenizers


def train_bpe(texts: Iterable[str], vocab_size: int):
  """A byte-level BPE (HF `tokenizers`) wrapped as a `transformers` tokenizer."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[EOS, PAD],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


def load_tokenizer(spec: str, save_dir: str | os.PathLike | None = None,
                   train_texts: Callable[[], Iterable[str]] | None = None):
  """`bpe:<vocab>` (trained once on `train_texts`, then reused) or a hub name/path.

  When `save_dir` holds a saved tokenizer it is loaded from there, so a resumed run,
  stage 2 and the sampler all see the tokenizer the run was trained with.
  """
  from transformers import AutoTokenizer
  if save_dir and (epath.Path(save_dir) / 'tokenizer_config.json').exists():
    return AutoTokenizer.from_pretrained(_local_dir(save_dir))
  if spec.startswith('bpe:'):
    try:
      vocab_size = int(spec[len('bpe:'):])
    except ValueError:
      raise DataError(f'tokenizer {spec!r}: write bpe:<vocab size>, e.g. bpe:8192.'
                      ) from None
    if train_texts is None:
      raise DataError(f'tokenizer {spec!r} must be trained, but there is no text.')
    logging.info('training a %d-token byte-level BPE tokenizer', vocab_size)
    tokenizer = train_bpe(train_texts(), vocab_size)
  else:
    try:
      local = os.path.isdir(spec) or not hub_reachable()
      tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=local)
    except Exception as e:
      raise DataError(f'cannot load tokenizer {spec!r} ({type(e).__name__}):'
                      f' {OFFLINE_HINT}') from e
  if tokenizer.eos_token_id is None:
    raise DataError(f'tokenizer {spec!r} has no EOS token to join documents with.')
  if tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token
  if save_dir:
    _save_tokenizer(tokenizer, save_dir)
  return tokenizer


def is_remote(path) -> bool:
  """gs://… and other URLs: reached through etils.epath, not the local filesystem."""
  return '://' in str(path)


def _local_dir(path) -> str:
  """A local directory with the files of `path` (a copy when it is remote)."""
  if not is_remote(path):
    return str(path)
  local = pathlib.Path(tempfile.mkdtemp(prefix='tokcom_tokenizer_'))
  for f in epath.Path(path).iterdir():
    (local / f.name).write_bytes(f.read_bytes())
  return str(local)


def _save_tokenizer(tokenizer, save_dir) -> None:
  if not is_remote(save_dir):
    tokenizer.save_pretrained(str(save_dir))
    return
  # transformers writes local files only: save, then copy to the bucket.
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer.save_pretrained(tmp)
    dst = epath.Path(save_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for f in pathlib.Path(tmp).iterdir():
      (dst / f.name).write_bytes(f.read_bytes())


def tokenizer_fingerprint(tokenizer) -> str:
  return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


# ------------------------------------------------------------------------ token cache


def default_cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get(
      'TOKCOM_JAX_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'tokcom_jax')))


def cache_path(cache_dir, source: str, split: str, tokenizer) -> pathlib.Path:
  key = hashlib.sha256(f'{source}|{split}|{tokenizer_fingerprint(tokenizer)}'.encode())
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
  or a kill never leaves a partial cache behind.
  """
  path = cache_path(cache_dir or default_cache_dir(), source, split, tokenizer)
  if not path.exists():
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = tokenize_to_stream(
        iter_documents(source, split, text_column, hf_split), tokenizer,
        desc=f'tokenizing {source} {split}')
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix='.npy.tmp',
                                     delete=False) as f:
      np.save(f, stream)
    os.replace(f.name, path)
    logging.info('cached %d %s tokens in %s', stream.size, split, path)
  return np.load(path, mmap_mode='r')


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


# ------------------------------------------------------------------------- a run's data


def run_tokenizer(config, save_dir):
  """The run's tokenizer: loaded from `save_dir`, or made (a BPE trained on the
  training split) by process 0 and saved there for the others and for the sampler."""
  import jax
  from jax.experimental import multihost_utils
  c = config
  texts = lambda: iter_documents(c.data.source, 'train', c.data.text_column,
                                 c.data.train_split)
  if jax.process_index() == 0:
    tokenizer = load_tokenizer(c.tokenizer, save_dir, texts)
  if jax.process_count() > 1:  # the others read what process 0 trained and saved
    multihost_utils.sync_global_devices('tokenizer')
    if jax.process_index() != 0:
      tokenizer = load_tokenizer(c.tokenizer, save_dir, texts)
  if len(tokenizer) > c.vocab_size:
    raise ConfigError(f'the tokenizer has {len(tokenizer)} tokens but vocab_size is'
                      f' {c.vocab_size}: set --config.vocab_size={len(tokenizer)} or'
                      ' more.')
  return tokenizer


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
