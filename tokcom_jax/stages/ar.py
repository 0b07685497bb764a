"""The autoregressive baseline: a causal Qwen2-style LM on the same windows, with the
same tokenizer, optimizer, checkpoints and logs, so that TokCom is measured against
what a user would otherwise train."""

from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import nnx

from tokcom_jax.models import flops, lm
from tokcom_jax.stages.base import Stage


class ARStage(Stage):
  name = 'ar'

  def build(self, rngs):
    return lm.CausalLM(lm.LMConfig.from_config(self.config), rngs=rngs)

  def loss(self, model, frozen, tokens_BL, rng):
    """Next-token cross-entropy over positions 1..L-1 of each window."""
    logits_BUV = model(tokens_BL)[:, :-1]
    targets_BU = tokens_BL[:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BUV, targets_BU).mean()
    accuracy = jnp.mean(jnp.argmax(logits_BUV, axis=-1) == targets_BU)
    return ce, {'loss': ce, 'ce': ce, 'token_accuracy': accuracy,
                'perplexity': jnp.exp(ce)}

  def sample(self, model, frozen, tokens_BL, key):
    """Continuations of each window's first chunk, drawn at temperature 1."""
    return lm.generate(*nnx.split(model), tokens_BL, self.config.chunk_size, key,
                       temperature=1.0)

  def train_flops(self, batch):
    return 3 * flops.lm_forward(self.config, batch)
