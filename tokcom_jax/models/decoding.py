"""Choosing tokens from logits: argmax, temperature, top-k and top-p (nucleus).

Shared by every generator (the VAE decoder's chunk logits, the autoregressive stage's
next-token logits), so that the same flags mean the same thing everywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tokcom_jax.errors import SamplingError

Array = jax.Array


def choose_tokens(logits_BLV: Array, key: Array, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0) -> Array:
  """Argmax when temperature is 0; else sampling from the filtered distribution."""
  if temperature <= 0:
    return jnp.argmax(logits_BLV, axis=-1)
  logits_BLV = logits_BLV / temperature
  if top_k > logits_BLV.shape[-1]:
    raise SamplingError(f'top_k {top_k} is more than the {logits_BLV.shape[-1]} tokens'
                        ' of the vocabulary: use fewer (0 keeps every token).')
  if top_k > 0:
    kth = jax.lax.top_k(logits_BLV, top_k)[0][..., -1:]
    logits_BLV = jnp.where(logits_BLV < kth, -jnp.inf, logits_BLV)
  if top_p < 1.0:
    sorted_BLV = jnp.sort(logits_BLV, axis=-1)[..., ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_BLV, axis=-1), axis=-1)
    # The smallest logit still inside the nucleus (the top token always is).
    cutoff = jnp.take_along_axis(
        sorted_BLV, jnp.sum(cum < top_p, axis=-1, keepdims=True), axis=-1)
    logits_BLV = jnp.where(logits_BLV < cutoff, -jnp.inf, logits_BLV)
  return jax.random.categorical(key, logits_BLV, axis=-1)
