"""The latent flow transformer: a DiT with adaLN-Zero over the N latents of a sequence,
and the layers only it uses (adaLN-Zero blocks, the timestep embedding).

It reads noisy latents x_t [B, N, Z] and the time t [B], and predicts the clean
latents x1 [B, N, Z]. Attention is bidirectional over chunk positions (RoPE on the
chunk index). Every block and the final layer start at zero output, so at
initialisation the body is the identity map and the prediction is zero.

With `causal` (`flow.order = 'chunkwise'`), chunk n attends to chunks ≤ n only, each
chunk has its own time t [B, N], and a second input stream carries the clean latent
of the chunk before (a learned start vector at chunk 0): the model predicts chunk n
from the clean chunks before it and its own noisy version, for every n at once in
training, and the sampler generates one chunk after another (samplers.chunkwise_sample).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from tokcom_jax.models import axes, layers, stacks

Array = jax.Array


# ------------------------------------------------------------- adaLN-Zero layers


def per_position(v: Array) -> Array:
  """A condition [B, D] (one per example) as [B, 1, D]; [B, T, D] (one per position,
  the chunkwise model's) as it is."""
  return v[:, None, :] if v.ndim == 2 else v


def modulate(x_BTD: Array, shift: Array, scale: Array) -> Array:
  return x_BTD * (1 + per_position(scale)) + per_position(shift)


class AdaLNZeroBlock(nnx.Module):
  """DiT block: the condition sets shift/scale/gate of attention and MLP.

  One zero-initialised projection of the condition gives all six vectors, so every
  gate starts at 0 and the block starts as the identity map of its input.
  """

  def __init__(self, cfg: layers.TransformerConfig, *, rngs: nnx.Rngs):
    D = cfg.hidden_size
    self.attn_norm = layers.rms_norm(D, cfg, use_scale=False, rngs=rngs)
    self.attn = layers.Attention(cfg, rngs=rngs)
    self.mlp_norm = layers.rms_norm(D, cfg, use_scale=False, rngs=rngs)
    self.mlp = layers.SwiGLU(cfg, rngs=rngs)
    self.modulation = layers.dense(D, 6 * D, ('embed', 'modulation'), dtype=cfg.dtype,
                                   use_bias=True, kernel_init=layers.zeros_init,
                                   rngs=rngs)

  def __call__(self, x_BTD: Array, cond: Array, positions_T: Array) -> Array:
    """`cond` [B, D] or [B, T, D] (see `per_position`)."""
    return self._apply(x_BTD, cond, lambda h: (self.attn(h, positions_T), None))[0]

  def decode(self, x_BTD: Array, cond: Array, cache, index: Array):
    """`__call__` of a causal block for T positions index.., attending over a KV
    cache of the positions before (`layers.Attention.decode`); (out, cache)."""
    return self._apply(x_BTD, cond, lambda h: self.attn.decode(h, cache, index))

  def _apply(self, x_BTD, cond, attend):
    (attn_shift, attn_scale, attn_gate,
     mlp_shift, mlp_scale, mlp_gate) = jnp.split(
         self.modulation(jax.nn.silu(cond)), 6, axis=-1)
    a_BTD, cache = attend(modulate(self.attn_norm(x_BTD), attn_shift, attn_scale))
    x_BTD = x_BTD + per_position(attn_gate) * a_BTD
    h_BTD = modulate(self.mlp_norm(x_BTD), mlp_shift, mlp_scale)
    return x_BTD + per_position(mlp_gate) * self.mlp(h_BTD), cache


class AdaLNFinalLayer(nnx.Module):
  """Norm, condition-dependent shift/scale, projection: all zero at init."""

  def __init__(self, cfg: layers.TransformerConfig, out_features: int, *,
               rngs: nnx.Rngs):
    D = cfg.hidden_size
    self.norm = layers.rms_norm(D, cfg, use_scale=False, rngs=rngs)
    self.modulation = layers.dense(D, 2 * D, ('embed', 'modulation'), dtype=cfg.dtype,
                                   use_bias=True, kernel_init=layers.zeros_init,
                                   rngs=rngs)
    self.proj = layers.dense(D, out_features, ('embed', 'latent'), dtype=cfg.dtype,
                             use_bias=True, kernel_init=layers.zeros_init, rngs=rngs)

  def __call__(self, x_BTD: Array, cond: Array) -> Array:
    shift, scale = jnp.split(self.modulation(jax.nn.silu(cond)), 2, axis=-1)
    return self.proj(modulate(self.norm(x_BTD), shift, scale))


def sinusoidal_embedding(t: Array, dim: int, max_period: float = 10_000.0) -> Array:
  """DiT's frequency embedding of each scalar of t (any shape, e.g. [B] or [B, N]):
  [cos(t·f), sin(t·f)] on a new last axis."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedding(nnx.Module):
  """t ∈ [0, 1] → sinusoidal features of 1000·t → Linear → SiLU → Linear."""

  def __init__(self, hidden_size: int, *, freq_dim: int = 256,
               time_scale: float = 1000.0, dtype=jnp.float32, rngs: nnx.Rngs):
    self.freq_dim = freq_dim
    self.time_scale = time_scale
    self.fc1 = layers.dense(freq_dim, hidden_size, ('freq', 'embed'), dtype=dtype,
                            use_bias=True, rngs=rngs)
    self.fc2 = layers.dense(hidden_size, hidden_size, ('embed', 'embed_out'),
                            dtype=dtype, use_bias=True, rngs=rngs)

  def __call__(self, t: Array) -> Array:
    features = sinusoidal_embedding(self.time_scale * t, self.freq_dim)
    return self.fc2(jax.nn.silu(self.fc1(features)))


# ------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiTConfig(layers.StackFields):
  latent_dim: int
  num_layers: int
  rope_theta: float = 10_000.0
  time_freq_dim: int = 256
  standardize: bool = False  # keep per-dimension latent statistics (flow.py)
  self_condition: bool = False  # read the previous x1 estimate too
  causal: bool = False  # chunkwise: chunk n reads clean chunks < n (module docstring)

  @property
  def transformer(self) -> layers.TransformerConfig:
    return layers.stack_config(self, self.num_layers, self.causal)

  @classmethod
  def from_config(cls, config) -> 'DiTConfig':
    """Reads `config.dit`; the latent size is the VAE's."""
    kwargs = layers.section_fields(cls, config.dit)
    return cls(latent_dim=config.vae.latent_dim,
               standardize=config.flow.standardize,
               self_condition=config.flow.self_condition,
               causal=config.flow.order == 'chunkwise',
               **layers.stack_options(config), **kwargs)


class LatentStat(nnx.Variable):
  """A statistic of the stage-1 latents, measured on data (never by gradients)."""


class LatentUnits:
  """The flow's units of a model with `cfg.standardize` (its `latent_mean` and
  `latent_std`, set from data when stage 2 starts: stages/flow.py)."""

  def init_latent_stats(self, latent_dim: int) -> None:
    if self.cfg.standardize:  # the identity until measured
      self.latent_mean = LatentStat(jnp.zeros((latent_dim,), jnp.float32))
      self.latent_std = LatentStat(jnp.ones((latent_dim,), jnp.float32))

  def to_flow(self, z_BNZ: Array) -> Array:
    """VAE latents → the flow's units (standardized per dimension, if enabled)."""
    if not self.cfg.standardize:
      return z_BNZ
    mean, std = (jax.lax.stop_gradient(v[...]) for v in (self.latent_mean,
                                                         self.latent_std))
    return (z_BNZ - mean) / std

  def to_latent(self, x_BNZ: Array) -> Array:
    """The flow's units → VAE latents (the inverse of `to_flow`)."""
    if not self.cfg.standardize:
      return x_BNZ
    mean, std = (jax.lax.stop_gradient(v[...]) for v in (self.latent_mean,
                                                         self.latent_std))
    return x_BNZ * std + mean


class LatentFlowTransformer(nnx.Module, LatentUnits):

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    tcfg = cfg.transformer
    D, Z = cfg.hidden_size, cfg.latent_dim
    self.input_proj = layers.dense(Z, D, ('latent', 'embed'), dtype=cfg.dtype,
                                   use_bias=True, rngs=rngs)
    self.time_embed = TimestepEmbedding(
        D, freq_dim=cfg.time_freq_dim, dtype=cfg.dtype, rngs=rngs)
    self.blocks = stacks.make_blocks(lambda r: AdaLNZeroBlock(tcfg, rngs=r), tcfg,
                                     rngs)
    self.final_layer = AdaLNFinalLayer(tcfg, Z, rngs=rngs)
    if cfg.self_condition:  # zero at init: the model starts as one that ignores it
      self.prev_proj = layers.dense(Z, D, ('latent', 'embed'), dtype=cfg.dtype,
                                    kernel_init=layers.zeros_init, rngs=rngs)
    if cfg.causal:  # the clean chunk before each chunk; a learned one before the first
      self.context_proj = layers.dense(Z, D, ('latent', 'embed'), dtype=cfg.dtype,
                                       rngs=rngs)
      self.start = nnx.Param(axes.partitioned(layers.zeros_init, 'embed')(
          rngs.params(), (D,), jnp.float32))
    self.init_latent_stats(Z)

  def body(self, h_BND: Array, cond: Array) -> Array:
    positions_N = jnp.arange(h_BND.shape[1])

    def layer(block, h_BND, _):
      return axes.constrain_batch(
          block(axes.constrain_batch(h_BND), cond, positions_N)), None
    return stacks.apply_blocks(self.blocks, self.cfg.transformer, layer, h_BND)[0]

  def __call__(self, x_t_BNZ: Array, t: Array, x1_prev_BNZ: Array | None = None,
               clean_BNZ: Array | None = None) -> Array:
    """Predicts x1 [B, N, Z] (fp32) from x_t [B, N, Z] and t ([B], or [B, N] for a
    chunkwise model); a self-conditioning model also reads its previous estimate
    x1_prev (zeros: none yet). A chunkwise (`causal`) model reads the clean latents
    `clean_BNZ` too, chunk n those of chunks < n only (what follows is never seen)."""
    cond, h_BND = self._inputs(x_t_BNZ, t, x1_prev_BNZ, clean_BNZ, 0)
    h_BND = self.body(h_BND, cond)
    return self.final_layer(h_BND, cond).astype(jnp.float32)

  def _inputs(self, x_t_BTZ, t, x1_prev_BTZ, clean_BNZ, index):
    """(condition, model-width input) of positions index..index+T-1."""
    cond = self.time_embed(t)
    h_BTD = self.input_proj(x_t_BTZ)
    if self.cfg.self_condition and x1_prev_BTZ is not None:
      h_BTD = h_BTD + self.prev_proj(x1_prev_BTZ)
    if self.cfg.causal:
      if clean_BNZ is None:
        raise ValueError('a chunkwise flow model reads the clean latents before each'
                         ' chunk: pass clean_BNZ (samplers.chunkwise_sample does).')
      before_T = index + jnp.arange(h_BTD.shape[1]) - 1  # the chunk before each
      before_BTD = self.context_proj(jnp.take(clean_BNZ, jnp.maximum(before_T, 0), 1))
      start = self.start[...].astype(before_BTD.dtype)
      h_BTD = h_BTD + jnp.where((before_T < 0)[:, None], start, before_BTD)
    return cond, h_BTD

  def init_cache(self, batch: int, length: int):
    """An empty KV cache of a chunkwise (causal) model for `length` chunks."""
    return layers.init_cache(self.cfg.transformer, batch, length)

  def decode(self, x_t_BTZ: Array, t_BT: Array, x1_prev_BTZ: Array | None,
             clean_BNZ: Array, caches, index: Array):
    """A chunkwise model's prediction [B, T, Z] for the T chunks at index..,
    attending over `caches` for the chunks before (what `__call__` gives there,
    given caches written by passes over those chunks); returns (x1, caches)."""
    cond, h_BTD = self._inputs(x_t_BTZ, t_BT, x1_prev_BTZ, clean_BNZ, index)

    def layer(block, h_BTD, cache):
      return block.decode(h_BTD, cond, cache, index)
    h_BTD, caches = stacks.apply_blocks(self.blocks, self.cfg.transformer, layer,
                                        h_BTD, caches)
    return self.final_layer(h_BTD, cond).astype(jnp.float32), caches
