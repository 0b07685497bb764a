"""Tokenizers: a byte-level BPE trained on the corpus (offline), or a hub tokenizer.

A run saves its tokenizer in its workdir (`<workdir>/tokenizer/`), so that a resumed
run, stage 2 and the sampler all read the one it was trained with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Callable, Iterable

import numpy as np
from etils import epath

from tokcom_jax.data.hub import hub_error, hub_reachable
from tokcom_jax.data.sources import cache_root, fingerprint, iter_documents
from tokcom_jax.errors import ConfigError, DataError, SamplingError
from tokcom_jax.storage.files import is_remote


EOS = '<|endoftext|>'
PAD = '<pad>'


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


def _check_local(spec: str) -> None:
  """A tokenizer named by a path (not a hub name): it must exist, and its
  tokenizer.json must be JSON; said as such, not as a hub failure."""
  path = os.path.expanduser(spec)
  if not (spec.startswith(('/', '.', '~')) or os.path.exists(path)):
    return  # a hub name such as Qwen/Qwen2-0.5B
  if not os.path.isdir(path):
    raise DataError(f'tokenizer {spec!r}: no such directory; pass a directory holding'
                    ' tokenizer.json (a saved tokenizer), a hub name, or bpe:N.')
  file = os.path.join(path, 'tokenizer.json')
  if os.path.exists(file):
    try:
      with open(file, 'rb') as f:
        json.load(f)
    except (OSError, ValueError) as e:
      raise DataError(f'tokenizer {spec!r}: {file} is not a tokenizer file'
                      f' ({type(e).__name__}: {str(e)[:80]}); save one with'
                      ' tokenizer.save_pretrained(DIR).') from None


def load_tokenizer(spec: str, save_dir: str | os.PathLike | None = None,
                   train_texts: Callable[[], Iterable[str]] | None = None,
                   trained_dir: str | os.PathLike | None = None):
  """`bpe:<vocab>` (trained once on `train_texts`, then reused) or a hub name/path.

  When `save_dir` holds a saved tokenizer it is loaded from there, so a resumed run,
  stage 2 and the sampler all see the tokenizer the run was trained with. A BPE
  trained on the same corpus before is read from `trained_dir` instead of being
  trained again (every stage and run on one corpus then shares one tokenizer).
  """
  if save_dir and (epath.Path(save_dir) / 'tokenizer_config.json').exists():
    return _from_dir(_local_dir(save_dir))
  if spec.startswith('bpe:'):
    try:
      vocab_size = int(spec[len('bpe:'):])
    except ValueError:
      raise DataError(f'tokenizer {spec!r}: write bpe:<vocab size>, e.g. bpe:8192.'
                      ) from None
    if train_texts is None:
      raise DataError(f'tokenizer {spec!r} must be trained, but there is no text.')
    if trained_dir and (pathlib.Path(trained_dir) / 'tokenizer_config.json').exists():
      tokenizer = _from_dir(str(trained_dir))
    else:
      logging.info('training a %d-token byte-level BPE tokenizer', vocab_size)
      tokenizer = train_bpe(train_texts(), vocab_size)
      if trained_dir:
        _save_tokenizer(tokenizer, trained_dir)
  else:
    from transformers import AutoTokenizer
    _check_local(spec)
    try:
      local = os.path.isdir(spec) or not hub_reachable()
      tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=local)
    except Exception as e:
      raise hub_error('tokenizer', spec, e) from e
  if tokenizer.eos_token_id is None:
    raise DataError(f'tokenizer {spec!r} has no EOS token to join documents with.')
  if tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token
  if save_dir:
    _save_tokenizer(tokenizer, save_dir)
  return tokenizer


def _from_dir(path: str):
  """A tokenizer saved with `save_pretrained` in the local directory `path`.

  The generic fast class (what `train_bpe` makes) is built directly: `AutoTokenizer`
  would give the same object a quarter of a second later (it resolves the class
  and imports the model-config registry). Any other class goes through `AutoTokenizer`.
  """
  import json
  from transformers import PreTrainedTokenizerFast
  config = pathlib.Path(path) / 'tokenizer_config.json'
  try:
    cls = json.loads(config.read_text()).get('tokenizer_class')
  except (OSError, ValueError, AttributeError):
    cls = None
  if cls == PreTrainedTokenizerFast.__name__:
    return PreTrainedTokenizerFast.from_pretrained(path)
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(path)


def _local_dir(path) -> str:
  """A local directory with the files of `path` (a copy when it is remote)."""
  if not is_remote(path):
    return str(path)
  local = pathlib.Path(tempfile.mkdtemp(prefix='tokcom_tokenizer_'))
  for f in epath.Path(path).iterdir():
    (local / f.name).write_bytes(f.read_bytes())
  return str(local)


def _save_tokenizer(tokenizer, save_dir) -> None:
  _write_dir(save_dir, lambda tmp: tokenizer.save_pretrained(str(tmp)))


def copy_tokenizer(src, dst) -> None:
  """The tokenizer saved in `src`, copied file by file to `dst` (a stage-2 run keeps
  its VAE's tokenizer, so that it loads wherever it is moved)."""
  if (epath.Path(dst) / 'tokenizer_config.json').exists():
    return

  def fill(tmp: pathlib.Path):
    for f in epath.Path(src).iterdir():
      (tmp / f.name).write_bytes(f.read_bytes())
  _write_dir(dst, fill)


def _write_dir(save_dir, fill) -> None:
  """A directory written whole or not at all: `fill(tmp)` writes it into a temporary
  directory beside `save_dir`, which is then renamed (a kill mid-write leaves no half
  tokenizer behind)."""
  if not is_remote(save_dir):
    save_dir = pathlib.Path(save_dir)
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=save_dir.parent, prefix='.tokenizer-'))
    fill(tmp)
    if save_dir.exists():  # an empty or partial directory from before
      shutil.rmtree(save_dir)
    os.replace(tmp, save_dir)
    return
  # transformers writes local files only: write, then copy to the bucket, with
  # tokenizer_config.json (what readers look for) last.
  with tempfile.TemporaryDirectory() as tmp:
    fill(pathlib.Path(tmp))
    dst = epath.Path(save_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(pathlib.Path(tmp).iterdir(),
                    key=lambda f: f.name == 'tokenizer_config.json'):
      (dst / f.name).write_bytes(f.read_bytes())


def tokenizer_fingerprint(tokenizer) -> str:
  return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def tokenizers_version() -> str:
  import tokenizers
  return tokenizers.__version__


def run_tokenizer(config, save_dir):
  """The run's tokenizer: loaded from `save_dir`, or made (a BPE trained on the
  training split) by process 0 and saved there for the others and for the sampler."""
  import jax
  from jax.experimental import multihost_utils
  c = config
  texts = lambda: iter_documents(c.data.source, 'train', c.data.text_column,
                                 c.data.train_split)
  key = '|'.join([c.tokenizer, fingerprint(c.data.source), c.data.text_column,
                  c.data.train_split, tokenizers_version()])
  trained = (pathlib.Path(c.data.cache_dir or cache_root()) / 'tokenizers'
             / hashlib.sha256(key.encode()).hexdigest()[:16])
  if jax.process_index() == 0:
    tokenizer = load_tokenizer(c.tokenizer, save_dir, texts, trained)
  if jax.process_count() > 1:  # the others read what process 0 trained and saved
    multihost_utils.sync_global_devices('tokenizer')
    if jax.process_index() != 0:
      tokenizer = load_tokenizer(c.tokenizer, save_dir, texts)
  if len(tokenizer) > c.vocab_size:
    raise ConfigError(f'the tokenizer has {len(tokenizer)} tokens but vocab_size is'
                      f' {c.vocab_size}: set --config.vocab_size={len(tokenizer)} or'
                      ' more.')
  return tokenizer


def text_ids(tokenizer, text: str) -> np.ndarray:
  """Token ids of a non-empty text (a one-line error for empty input; whitespace
  is text: an indentation is valid code)."""
  if not text:
    raise SamplingError('the input text is empty: pass some text.')
  try:
    text.encode('utf-8')
  except UnicodeEncodeError:  # bytes from the command line that are not UTF-8
    raise SamplingError('the input text is not valid UTF-8: pass UTF-8 text (e.g.'
                        ' convert it with iconv -t UTF-8).') from None
  ids = tokenizer(text, add_special_tokens=False)['input_ids']
  if not ids:
    raise SamplingError('the input text tokenizes to nothing: pass other text.')
  return np.asarray(ids, np.int32)


def ids_text(tokenizer, ids) -> str:
  """Text of token ids, special tokens (EOS between documents) left out."""
  return tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=True)
