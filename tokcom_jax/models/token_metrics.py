"""How well logits over a window's tokens give them back: the CE, token accuracy and
chunk exact-match that stage 1 trains on and stage 2 reports through the decoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def reconstruction_metrics(logits_BLV: Array, tokens_BL: Array, mask_BL: Array,
                           chunk_size: int, predicted_BL: Array | None = None
                           ) -> dict[str, Array]:
  """Masked token cross-entropy, token accuracy and chunk exact-match (of
  `predicted_BL`, the argmax of the logits when not given).

  A chunk counts for exact-match when it holds at least one real token; it matches
  when all its real tokens are predicted right.
  """
  mask_BL = mask_BL.astype(jnp.float32)
  num_tokens = jnp.maximum(mask_BL.sum(), 1.0)
  ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, tokens_BL)
  if predicted_BL is None:
    predicted_BL = jnp.argmax(logits_BLV, axis=-1)
  correct_BL = (predicted_BL == tokens_BL).astype(jnp.float32)
  B, L = tokens_BL.shape
  wrong_BNK = ((1.0 - correct_BL) * mask_BL).reshape(B, L // chunk_size, chunk_size)
  real_chunk_BN = mask_BL.reshape(B, L // chunk_size, chunk_size).max(axis=-1)
  chunk_right_BN = (wrong_BNK.sum(axis=-1) == 0).astype(jnp.float32) * real_chunk_BN
  return {
      'ce': (ce_BL * mask_BL).sum() / num_tokens,
      'token_accuracy': (correct_BL * mask_BL).sum() / num_tokens,
      'chunk_exact_match': chunk_right_BN.sum() / jnp.maximum(real_chunk_BN.sum(), 1.0),
  }
