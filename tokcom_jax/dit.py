"""The latent flow transformer: a DiT with adaLN-Zero over the N latents of a sequence.

It reads noisy latents x_t [B, N, Z] and the time t [B], and predicts the clean
latents x1 [B, N, Z]. Attention is bidirectional over chunk positions (RoPE on the
chunk index). Every block and the final layer start at zero output, so at
initialisation the body is the identity map and the prediction is zero.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tokcom_jax import layers

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  latent_dim: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  rope_theta: float = 10_000.0
  rms_eps: float = 1e-6
  time_freq_dim: int = 256
  dtype: Any = jnp.float32

  @property
  def transformer(self) -> layers.TransformerConfig:
    return layers.TransformerConfig(
        hidden_size=self.hidden_size, num_layers=self.num_layers,
        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
        intermediate_size=self.intermediate_size, rope_theta=self.rope_theta,
        rms_eps=self.rms_eps, causal=False, dtype=self.dtype)

  @classmethod
  def from_config(cls, config) -> 'DiTConfig':
    """Reads `config.dit`; the latent size is the VAE's."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in config.dit.items() if k in fields}
    return cls(latent_dim=config.vae.latent_dim,
               dtype=jnp.dtype(config.compute_dtype), **kwargs)


class LatentFlowTransformer(nnx.Module):

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    tcfg = cfg.transformer
    D, Z = cfg.hidden_size, cfg.latent_dim
    self.input_proj = layers.dense(Z, D, ('latent', 'embed'), dtype=cfg.dtype,
                                   use_bias=True, rngs=rngs)
    self.time_embed = layers.TimestepEmbedding(
        D, freq_dim=cfg.time_freq_dim, dtype=cfg.dtype, rngs=rngs)
    self.blocks = nnx.List(
        [layers.AdaLNZeroBlock(tcfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_layer = layers.AdaLNFinalLayer(tcfg, Z, rngs=rngs)

  def body(self, h_BND: Array, cond_BD: Array) -> Array:
    positions_N = jnp.arange(h_BND.shape[1])
    for block in self.blocks:
      h_BND = layers.constrain_batch(block(layers.constrain_batch(h_BND), cond_BD,
                                           positions_N))
    return h_BND

  def __call__(self, x_t_BNZ: Array, t_B: Array) -> Array:
    """Predicts x1 [B, N, Z] (fp32) from x_t [B, N, Z] and t [B]."""
    cond_BD = self.time_embed(t_B)
    h_BND = self.body(self.input_proj(x_t_BNZ), cond_BD)
    return self.final_layer(h_BND, cond_BD).astype(jnp.float32)
