"""The autoregressive baseline: a causal Qwen2-style token LM and its KV-cache sampler.

Built from the same layers as the VAE and the flow model (`tokcom_jax.models.layers`), so the
baseline differs from TokCom in what it models, not in how its blocks are made.

    model = CausalLM(LMConfig.from_config(config), rngs=nnx.Rngs(0))
    logits_BTV = model(tokens_BT)                       # teacher-forced, fp32
    ce_BU = token_ce(model, tokens_BT)                  # U = T-1 predicted positions
    graphdef, params = nnx.split(model)
    out_BS = generate(graphdef, params, buffer_BS, prompt_len, jax.random.key(0),
                      max_new_tokens=32, temperature=1.0, top_k=50)

B batch, T sequence, S token buffer length, D model width, V vocab.
The KV cache layout is described in `tokcom_jax.models.layers`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tokcom_jax.models import axes, layers, stacks, static
from tokcom_jax.models.decoding import choose_tokens

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig(layers.StackFields):
  vocab_size: int
  num_layers: int
  tie_embeddings: bool = False  # lm_head = embedding matrix, as in Qwen2-0.5B

  @property
  def transformer(self) -> layers.TransformerConfig:
    return layers.stack_config(self, self.num_layers, True)

  @classmethod
  def from_config(cls, config) -> 'LMConfig':
    """Reads `config.ar` and the shared fields of a tokcom_jax ConfigDict."""
    kwargs = layers.section_fields(cls, config.ar)
    return cls(vocab_size=config.vocab_size, **layers.stack_options(config),
               **kwargs)


class CausalLM(nnx.Module):
  """Token embedding → causal transformer (with final norm) → lm_head (or tied)."""

  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, V = cfg.hidden_size, cfg.vocab_size
    self.embed = nnx.Embed(
        V, D, dtype=cfg.dtype,
        embedding_init=axes.partitioned(layers.default_init, 'vocab', 'embed'),
        rngs=rngs)
    self.transformer = layers.Transformer(cfg.transformer, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = layers.dense(D, V, ('embed', 'vocab'), dtype=cfg.dtype,
                                  rngs=rngs)

  def logits(self, h_BTD: Array) -> Array:
    """Final hidden states → logits [B, T, V] in fp32 (the loss wants fp32)."""
    if self.cfg.tie_embeddings:
      return self.embed.attend(h_BTD).astype(jnp.float32)
    return self.lm_head(h_BTD).astype(jnp.float32)

  def __call__(self, tokens_BT: Array) -> Array:
    """Token ids [B, T] → next-token logits [B, T, V]; position t sees tokens ≤ t."""
    return self.logits(self.transformer(self.embed(tokens_BT)))

  def init_cache(self, batch: int, length: int):
    return self.transformer.init_cache(batch, length)

  def decode(self, tokens_BT: Array, caches, index: Array) -> tuple[Array, Any]:
    """Tokens at absolute positions index..index+T-1 → (hidden [B, T, D], caches).

    Returns hidden states, not logits, so that a prefill over the whole buffer does
    not pay for a [B, S, V] projection nobody reads; apply `logits` to what is needed.
    """
    return self.transformer.decode(self.embed(tokens_BT), caches, index)


def token_ce(model: CausalLM, tokens_BT: Array) -> Array:
  """Per-token next-token cross-entropy [B, T-1] (nats), for perplexity.

  Entry [b, t] is -log p(tokens[b, t+1] | tokens[b, :t+1]): position 0 has no prefix
  and is not scored. Masking padding is the caller's job.
  """
  logits_BTV = model(tokens_BT)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BTV[:, :-1], tokens_BT[:, 1:])


def generate(graphdef: nnx.GraphDef, params: nnx.State, buffer_BS: Array,
             prompt_len, key: Array, *, max_new_tokens=None,
             temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0) -> Array:
  """Continues the prompts in `buffer_BS` with a KV cache; returns tokens [B, S].

  `buffer_BS` holds the prompts in positions < prompt_len (the same length for every
  row; anything, e.g. padding, after). Positions prompt_len .. end-1, with end =
  min(S, prompt_len + max_new_tokens) (S when max_new_tokens is None), get new
  tokens; all other positions come back exactly as given. prompt_len must be ≥ 1:
  position 0 has nothing to be predicted from (a prompt of 0 is treated as 1).

  The token at position p is `choose_tokens(logits, jax.random.fold_in(key, p), ...)`
  of the logits predicted at p-1, so the result does not depend on how the logits
  were computed (cache or recomputation) nor on how many tokens were asked for.

  Compiles once per (B, S, params, temperature, top_k, top_p): prompt_len and
  max_new_tokens are traced int32 scalars, and the loop is a `fori_loop` with traced
  bounds. `graphdef, params = nnx.split(model)`.
  """
  S = buffer_BS.shape[1]
  if max_new_tokens is None:
    max_new_tokens = S
  return _generate(graphdef, params, jnp.asarray(buffer_BS, jnp.int32),
                   jnp.asarray(prompt_len, jnp.int32),
                   jnp.asarray(max_new_tokens, jnp.int32), key,
                   float(temperature), int(top_k), float(top_p))


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8))
def _generate(graphdef, params, buffer_BS, prompt_len, max_new_tokens, key,
              temperature, top_k, top_p):
  model = stacks.as_loop(nnx.merge(static.graphdef(graphdef), params))
  B, S = buffer_BS.shape
  start = jnp.clip(prompt_len, 1, S)
  end = jnp.clip(start + jnp.maximum(max_new_tokens, 0), start, S)
  # Prefill: one causal pass over the whole buffer writes every slot. Slots ≥ start
  # hold padding's k/v, but each is overwritten (by the step that feeds that
  # position) before any query may see it.
  _, caches = model.decode(buffer_BS, model.init_cache(B, S), jnp.int32(0))

  def step(p, carry):
    """Feeds the token at p-1, chooses the token at p."""
    tokens_BS, caches = carry
    last_B1 = jax.lax.dynamic_slice_in_dim(tokens_BS, p - 1, 1, axis=1)
    h_B1D, caches = model.decode(last_B1, caches, p - 1)
    next_B = choose_tokens(model.logits(h_B1D)[:, 0], jax.random.fold_in(key, p),
                           temperature, top_k, top_p)
    tokens_BS = jax.lax.dynamic_update_slice_in_dim(
        tokens_BS, next_B[:, None].astype(tokens_BS.dtype), p, axis=1)
    return tokens_BS, caches

  tokens_BS, _ = jax.lax.fori_loop(start, end, step, (buffer_BS, caches))
  return tokens_BS
