"""Stage 1: the chunk VAE learns to turn every K tokens into one latent and back."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tokcom_jax import flops, vae
from tokcom_jax.stages.base import Stage


class VAEStage(Stage):
  name = 'vae'
  sample_columns = ('step', 'input', 'reconstruction', 'token_accuracy')
  sample_table = 'vae/reconstructions'

  def build(self, rngs):
    return vae.ChunkVAE(vae.VAEConfig.from_config(self.config), rngs=rngs)

  def loss(self, model, frozen, tokens_BL, rng):
    return vae.loss_fn(model, tokens_BL, jnp.ones_like(tokens_BL), rng)

  def sample(self, model, frozen, tokens_BL, key):
    """Reconstructions of the windows through their latent means."""
    return jnp.argmax(model.decode(model.encode(tokens_BL)[0]), axis=-1)

  def sample_rows(self, real_BL, out_BL, decode):
    return [{'input': decode(r), 'reconstruction': decode(o),
             'token_accuracy': float(np.mean(r == o))} for r, o in zip(real_BL, out_BL)]

  def train_flops(self, batch):
    forward = flops.vae_forward(self.config, batch)
    return 3 * (forward['encoder'] + forward['decoder'])
