"""Small heads that turn one trunk state into one latent: MAR's flow head, CALM's
energy head.

Both read a condition c [M, D] (the trunk's state at a chunk position; M rows of any
batch layout) and give a latent [M, Z] in the flow's units.

- `FlowHead` (MAR's `SimpleMLPAdaLN`): residual MLP blocks whose LayerNorm shift,
  scale and gate come from (time embedding + projection of c); the output projection
  starts at zero. It predicts x1 (or, with `predict='velocity'`, the velocity x1 - x0)
  at a point x_t of the straight path, so a sampler takes Euler steps with it.
- `EnergyHead` (CALM's): the same blocks, conditioned on c alone, map a draw of
  uniform noise to a latent in one pass; trained with the energy score
  (`energy_score`), a strictly proper scoring rule, so its samples follow the
  conditional distribution without any ODE.

M rows, Z latent size, D trunk width, W head width, S samples per row.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from tokcom_jax.models import dit, layers

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadConfig:
  kind: str = 'flow'  # or 'energy'
  width: int = 256
  blocks: int = 3
  batch_mul: int = 4  # (noise, t) draws (flow) or samples (energy) per position
  predict: str = 'x1'  # or 'velocity' (flow head)
  input: str = 'tokens'  # the trunk reads chunk n-1's 'tokens' or its 'latent'
  token_loss: float = 0.0  # weight of the trunk's next-chunk token CE
  # How the flow head's modulations read (t, h): 'joint' (MAR's: one projection of
  # silu(t_emb + h)) or 'separate' (a projection of silu(t_emb) plus one of silu(h):
  # the state's part computed once per chunk, the time's once per step for all rows).
  condition: str = 'joint'
  time_freq_dim: int = 256

  @classmethod
  def from_config(cls, config) -> 'HeadConfig':
    return cls(**layers.section_fields(cls, config.head))


def _dense(i: int, o: int, *, zero: bool = False, rngs: nnx.Rngs) -> nnx.Linear:
  return layers.dense(i, o, ('latent', 'embed') if i <= o else ('embed', 'latent'),
                      dtype=jnp.float32, use_bias=True, rngs=rngs,
                      **({'kernel_init': layers.zeros_init} if zero else {}))


class ResBlock(nnx.Module):
  """x + gate·MLP(LN(x)·(1 + scale) + shift), with (shift, scale, gate) given."""

  def __init__(self, width: int, *, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(width, use_scale=False, use_bias=False, epsilon=1e-6,
                              rngs=rngs)
    self.fc1 = _dense(width, width, rngs=rngs)
    self.fc2 = _dense(width, width, rngs=rngs)

  def __call__(self, x_MW: Array, shift: Array, scale: Array, gate: Array) -> Array:
    h_MW = self.norm(x_MW) * (1 + scale) + shift
    return x_MW + gate * self.fc2(jax.nn.silu(self.fc1(h_MW)))


class _Body(nnx.Module):
  """Input projection, residual blocks, a final layer with a zero projection. One
  zero-initialised projection of the condition gives every block's (shift, scale,
  gate) and the final layer's (shift, scale): one matmul per call, not one per
  block (a head step at batch 1 costs its matmuls' launches), and every block
  starts as the identity."""

  def __init__(self, in_features: int, cfg: HeadConfig, latent_dim: int, *,
               rngs: nnx.Rngs):
    W = cfg.width
    self.input_proj = _dense(in_features, W, rngs=rngs)
    self.res_blocks = nnx.List([ResBlock(W, rngs=rngs) for _ in range(cfg.blocks)])
    self.final_norm = nnx.LayerNorm(W, use_scale=False, use_bias=False, epsilon=1e-6,
                                    rngs=rngs)
    self.modulation = _dense(W, (3 * cfg.blocks + 2) * W, zero=True, rngs=rngs)
    self.out_proj = _dense(W, latent_dim, zero=True, rngs=rngs)

  def __call__(self, x_MI: Array, c_MW: Array, *, modulated: bool = False) -> Array:
    """`modulated`: c is the modulation vector itself, not the condition."""
    h_MW = self.input_proj(x_MI)
    mods = jnp.split(c_MW if modulated else self.modulation(jax.nn.silu(c_MW)),
                     3 * len(self.res_blocks) + 2, axis=-1)
    for i, block in enumerate(self.res_blocks):
      h_MW = block(h_MW, *mods[3 * i:3 * i + 3])
    shift, scale = mods[-2:]
    return self.out_proj(self.final_norm(h_MW) * (1 + scale) + shift)


class FlowHead(nnx.Module):

  def __init__(self, cfg: HeadConfig, cond_dim: int, latent_dim: int, *,
               self_condition: bool = False, rngs: nnx.Rngs):
    self.cfg = cfg
    self.self_condition = self_condition
    self.time_embed = dit.TimestepEmbedding(cfg.width, freq_dim=cfg.time_freq_dim,
                                            rngs=rngs)
    self.cond_proj = _dense(cond_dim, cfg.width, rngs=rngs)
    self.body = _Body(latent_dim * (2 if self_condition else 1), cfg, latent_dim,
                      rngs=rngs)
    if cfg.condition == 'separate':  # the time's share; the state's is body.modulation
      self.time_modulation = _dense(cfg.width, (3 * cfg.blocks + 2) * cfg.width,
                                    zero=True, rngs=rngs)

  def condition(self, c_MD: Array) -> Array:
    """The trunk state's share of the condition: the same at every step of a chunk,
    so a sampler computes it once (`projected=True` below): [M, W], or with
    `separate` conditioning the state's share of the modulations."""
    c_MW = self.cond_proj(c_MD.astype(jnp.float32))
    if self.cfg.condition == 'separate':
      return self.body.modulation(jax.nn.silu(c_MW))
    return c_MW

  def __call__(self, x_t_MZ: Array, t_M: Array, c_MD: Array,
               x1_prev_MZ: Array | None = None, *, projected: bool = False) -> Array:
    """The raw output at (x_t, t) given c: x1, or the velocity (`cfg.predict`).
    `projected`: c is `condition(c)` already. `t_M` may be [1]: one time for all
    rows, as a sampler's step has (its embedding is then computed once)."""
    c = c_MD if projected else self.condition(c_MD)
    t_emb = self.time_embed(t_M)
    x_MI = x_t_MZ
    if self.self_condition:
      prev = jnp.zeros_like(x_t_MZ) if x1_prev_MZ is None else x1_prev_MZ
      x_MI = jnp.concatenate([x_t_MZ, prev], axis=-1)
    if self.cfg.condition == 'separate':
      mods = c + self.time_modulation(jax.nn.silu(t_emb))
      return self.body(x_MI, mods, modulated=True).astype(jnp.float32)
    return self.body(x_MI, t_emb + c).astype(jnp.float32)

  def x1(self, x_t_MZ: Array, t_M: Array, c_MD: Array,
         x1_prev_MZ: Array | None = None, *, projected: bool = False) -> Array:
    """The prediction of x1, whatever the head is trained to output."""
    out_MZ = self(x_t_MZ, t_M, c_MD, x1_prev_MZ, projected=projected)
    if self.cfg.predict == 'x1':
      return out_MZ
    return x_t_MZ + (1.0 - t_M)[:, None] * out_MZ  # x1 = x_t + (1 - t)·v


class EnergyHead(nnx.Module):

  def __init__(self, cfg: HeadConfig, cond_dim: int, latent_dim: int, *,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.latent_dim = latent_dim
    self.cond_proj = _dense(cond_dim, cfg.width, rngs=rngs)
    self.body = _Body(latent_dim, cfg, latent_dim, rngs=rngs)

  def __call__(self, noise_MZ: Array, c_MD: Array) -> Array:
    """A latent drawn for each row: `noise_MZ` ~ U[-0.5, 0.5]^Z (CALM's) → x [M, Z]."""
    return self.body(noise_MZ, self.cond_proj(c_MD.astype(jnp.float32))
                     ).astype(jnp.float32)


def energy_score(samples_SMZ: Array, target_MZ: Array) -> Array:
  """CALM's energy loss per row [M] (α = 1), an estimate of the energy distance
  E‖X - y‖ - ½ E‖X - X'‖ from S ≥ 2 samples X of each row:
  (1/S) Σ_i ‖x_i - y‖ - 1/(2·S(S-1)) Σ_{i≠j} ‖x_i - x_j‖. Minimised when the
  samples follow the distribution y is drawn from (a strictly proper scoring rule)."""
  S = samples_SMZ.shape[0]
  dist = lambda a, b: jnp.sqrt(jnp.sum(jnp.square(a - b), -1) + 1e-8)
  to_target_M = jnp.mean(dist(samples_SMZ, target_MZ[None]), axis=0)
  pair_SSM = dist(samples_SMZ[:, None], samples_SMZ[None])
  off_diagonal = (1.0 - jnp.eye(S))[:, :, None]
  between_M = jnp.sum(pair_SSM * off_diagonal, axis=(0, 1)) / (S * (S - 1))
  return to_target_M - 0.5 * between_M
