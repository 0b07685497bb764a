"""A trained autoregressive baseline (an `ar` run): generate text, score text.

    baseline = tokcom_jax.load('runs/tiny/ar')
    print(baseline.generate(2, prompt='def ')[0])
    ce = baseline.token_ce([[12, 34, 56]])      # per-token cross-entropy, nats
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from tokcom_jax import stages
from tokcom_jax.data.tokenizer import ids_text, text_ids
from tokcom_jax.errors import SamplingError
from tokcom_jax.models import lm, static


class AutoregressiveLM:
  """A trained autoregressive baseline (an `ar` run): generate text, score text.

  A sample starts after EOS, the token that separates documents in the training
  stream, so that it begins where a document begins; a prompt follows the EOS.
  """

  def __init__(self, config: ml_collections.ConfigDict, tokenizer, params,
               workdir: str = ''):
    self.config, self.tokenizer, self.params, self.workdir = (
        config, tokenizer, params, workdir)
    self.graphdef = nnx.graphdef(nnx.eval_shape(
        lambda: stages.get(config, 'ar').build(nnx.Rngs(0))))
    self.static_graphdef = static.Static(self.graphdef)  # hashed by identity
    self.max_length = config.max_length
    self.eos = tokenizer.eos_token_id

  @functools.partial(jax.jit, static_argnums=0)
  def _token_ce(self, params, tokens_BT):
    return lm.token_ce(nnx.merge(self.graphdef, params), tokens_BT)

  def sample(self, num_samples: int = 1, num_tokens: int | None = None,
             seed: int = 0, prompt: str | None = None, batch_size: int | None = None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
             ) -> np.ndarray:
    """Token ids [S, P + num_tokens]: the prompt's P tokens, then the new ones
    (default: as many as fit in the trained context of max_length)."""
    prompt_ids = text_ids(self.tokenizer, prompt) if prompt else np.zeros(0, np.int32)
    room = self.max_length - 1 - len(prompt_ids)
    num_tokens = room if num_tokens is None else num_tokens
    if room < 1:
      raise SamplingError(f'the prompt is {len(prompt_ids)} tokens, which leaves'
                          f' nothing of the {self.max_length}-token context: shorten it.')
    if not 0 < num_tokens <= room:
      raise SamplingError(f'num_tokens {num_tokens} must be between 1 and {room}'
                          ' (the trained context less the prompt).')
    check_counts(num_samples, batch_size)
    batch_size = batch_size or num_samples
    P, out = len(prompt_ids), []
    for first in batch_starts(num_samples, batch_size):
      B = min(batch_size, num_samples - first)
      buffer = np.full((B, self.max_length), self.eos, np.int32)
      buffer[:, 1:1 + P] = prompt_ids
      tokens = lm.generate(self.static_graphdef, self.params, buffer, 1 + P,
                           jax.random.fold_in(jax.random.key(seed), first),
                           max_new_tokens=num_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p)
      out.append(np.asarray(tokens)[:, 1:1 + P + num_tokens])
    return np.concatenate(out)

  def generate(self, num_samples: int = 1, num_tokens: int | None = None,
               seed: int = 0, prompt: str | None = None, batch_size: int | None = None,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
               ) -> list[str]:
    """Texts sampled token by token (KV cache); with `prompt`, each starts with it."""
    tokens = self.sample(num_samples, num_tokens, seed, prompt, batch_size,
                         temperature, top_k, top_p)
    skip = len(text_ids(self.tokenizer, prompt)) if prompt else 0
    return [(prompt or '') + ids_text(self.tokenizer, row[skip:]) for row in tokens]

  def token_ce(self, token_lists, batch_size: int = 32) -> list[np.ndarray]:
    """Per-token cross-entropy (nats) of each token sequence under this model, each
    token predicted from EOS and the tokens before it; sequences longer than the
    context less one are cut to it."""
    L = self.max_length
    rows = [np.concatenate([[self.eos], np.asarray(t, np.int32)[:L - 1]])
            for t in token_lists]
    out = []
    for first in range(0, len(rows), batch_size):
      batch = rows[first:first + batch_size]
      buffer = np.full((len(batch), L), self.eos, np.int32)
      for i, r in enumerate(batch):
        buffer[i, :len(r)] = r
      ce = np.asarray(self._token_ce(self.params, jnp.asarray(buffer)))
      out.extend(ce[i, :len(r) - 1] for i, r in enumerate(batch))
    return out


def batch_starts(num_samples: int, batch_size: int):
  """The first sample of each batch, with a progress bar on stderr once sampling
  has taken more than 2 seconds (none for a quick call)."""
  return tqdm(range(0, num_samples, batch_size), desc='sampling', unit='batch',
              delay=2, leave=False, disable=num_samples <= batch_size)


def check_counts(num_samples: int, batch_size: int | None) -> None:
  if num_samples < 1:
    raise SamplingError(f'num_samples must be a positive number, got {num_samples}.')
  if batch_size is not None and batch_size < 1:
    raise SamplingError(f'batch_size must be a positive number, got {batch_size}.')
