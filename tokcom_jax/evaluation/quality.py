"""How much generated text reads like the corpus, measured against real text.

Every set of texts (held-out real windows, the same windows with their words
shuffled, TokCom's samples, the autoregressive stage's samples) is scored the same way:

  perplexity       exp(mean next-token cross-entropy) under a reference `ar` run, each
                   text re-tokenized by the reference's tokenizer and read after EOS
  unigram_entropy  bits per token of the same reference tokens, pooled: a sampler
                   that repeats a few likely tokens gets low perplexity and low entropy
  chunk_validity   the share of the text's K-token chunks (re-tokenized by the
                   evaluated run's tokenizer) that occur at any offset of the training
                   token stream: text off the data manifold has chunks the corpus never has

Shuffled real words are the floor any generator must beat; real text is the ceiling.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from tokcom_jax.evaluation import text_metrics


def find_reference(workdir: str) -> str | None:
  """The newest trained `ar` run beside `workdir` (runs/tiny/diffusion →
  runs/tiny/ar), or `workdir` itself when it is one; None when there is none."""
  parent = os.path.dirname(os.path.abspath(workdir))
  found = []
  for config in glob.glob(os.path.join(parent, '*', 'config.json')):
    run = os.path.dirname(config)
    try:
      stage = json.load(open(config)).get('stage')
    except (OSError, json.JSONDecodeError):
      continue
    if stage == 'ar' and os.path.isdir(os.path.join(run, 'checkpoints')):
      found.append(run)
  if not found:
    return None
  best = max(found, key=lambda r: os.path.getmtime(os.path.join(r, 'checkpoints')))
  return best if os.path.isabs(workdir) else os.path.relpath(best)  # named as given


def _ids(tokenizer, text: str) -> np.ndarray:
  return np.asarray(tokenizer(text, add_special_tokens=False)['input_ids'], np.int64)


def score(texts: list[str], reference, index: text_metrics.ChunkIndex, tokenizer,
          batch_size: int = 32) -> dict:
  """The three numbers of one set of texts (see the module docstring)."""
  ref_ids = [_ids(reference.tokenizer, t) for t in texts]
  ce = reference.token_ce([i for i in ref_ids if len(i)], batch_size)
  return {
      'perplexity': text_metrics.perplexity_from_token_ce(ce),
      'unigram_entropy': text_metrics.unigram_entropy(
          [i[:reference.max_length - 1] for i in ref_ids]),
      'chunk_validity': text_metrics.chunk_validity(
          index, [_ids(tokenizer, t) for t in texts]),
      'num_texts': len(texts),
      'mean_tokens': float(np.mean([len(i) for i in ref_ids])),
  }


def generation_quality(texts: dict[str, list[str]], reference, train_stream,
                       tokenizer, chunk_size: int, batch_size: int = 32) -> dict:
  """{row name: score} for each set of texts, plus the reference used."""
  index = text_metrics.ChunkIndex(train_stream, chunk_size)
  rows = {name: score(t, reference, index, tokenizer, batch_size)
          for name, t in texts.items() if t}
  return {'reference': reference.workdir, 'rows': rows}


def shuffled(texts: list[str], seed: int) -> list[str]:
  rng = np.random.default_rng(seed)
  return [text_metrics.shuffle_words(t, rng) for t in texts]


def markdown_table(quality: dict) -> str:
  lines = ['| text | perplexity | unigram entropy (bits) | chunk validity |',
           '|---|---|---|---|']
  for name, r in quality['rows'].items():
    lines.append(f'| {name} | {r["perplexity"]:.2f} | {r["unigram_entropy"]:.3f} |'
                 f' {r["chunk_validity"]:.3f} |')
  return '\n'.join(lines)
