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
  # Shortcuts (`shortcut_step`): 0 off; S (a power of 2 ≥ 2): the flow head also
  # learns steps of 2/S, 4/S, …, 1 from two of its own half-size steps, those of
  # 1/S being the flow's, so that it samples in 1, 2, 4, … steps.
  shortcut_from: int = 0

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
    if cfg.shortcut_from:  # the step size d, embedded like the time and added to it
      self.step_embed = dit.TimestepEmbedding(cfg.width, freq_dim=cfg.time_freq_dim,
                                              rngs=rngs)

  def _time(self, t: Array, d: Array | None) -> Array:
    """The time's (and step size's) embedding; d = 0 (or None): the flow's."""
    t_emb = self.time_embed(t)
    if self.cfg.shortcut_from:
      t_emb = t_emb + self.step_embed(jnp.zeros_like(t) if d is None else d)
    return t_emb

  def step_size(self, steps: int) -> float:
    """The step size a sampler of `steps` uniform steps tells the head: 1/steps
    where it learned shortcuts of that size, else 0 (the flow)."""
    S = self.cfg.shortcut_from
    return 1.0 / steps if S and steps < S and S % steps == 0 else 0.0

  def condition(self, c_MD: Array) -> Array:
    """The trunk state's share of the condition: the same at every step of a chunk,
    so a sampler computes it once (`projected=True` below): [M, W], or with
    `separate` conditioning the state's share of the modulations."""
    c_MW = self.cond_proj(c_MD.astype(jnp.float32))
    if self.cfg.condition == 'separate':
      return self.body.modulation(jax.nn.silu(c_MW))
    return c_MW

  def modulations(self, t_T: Array, c_MW: Array, d: float = 0.0) -> Array:
    """Every block's modulations at each of the times t [T] for the projected
    conditions c [M, W] (`condition`): [T, M, (3·blocks + 2)·W]. They do not depend
    on x_t, so a sampler with a fixed grid computes all its steps' in one matmul
    (at batch 1 a step's cost is the weights it reads: this reads them once)."""
    t_emb_T1W = self._time(t_T, jnp.full_like(t_T, d))[:, None]
    if self.cfg.condition == 'separate':
      return c_MW[None] + self.time_modulation(jax.nn.silu(t_emb_T1W))
    return self.body.modulation(jax.nn.silu(t_emb_T1W + c_MW[None]))

  def __call__(self, x_t_MZ: Array, t_M: Array, c_MD: Array,
               x1_prev_MZ: Array | None = None, *, projected: bool = False,
               mods_MX: Array | None = None, d_M: Array | None = None) -> Array:
    """The raw output at (x_t, t) given c: x1, or the velocity (`cfg.predict`).
    `projected`: c is `condition(c)` already. `t_M` may be [1]: one time for all
    rows, as a sampler's step has (its embedding is then computed once). `mods_MX`:
    the modulations at (t, c) (`modulations`), c then unused. `d_M`: the step size
    of a shortcut head (None: 0, the flow)."""
    x_MI = x_t_MZ
    if self.self_condition:
      prev = jnp.zeros_like(x_t_MZ) if x1_prev_MZ is None else x1_prev_MZ
      x_MI = jnp.concatenate([x_t_MZ, prev], axis=-1)
    if mods_MX is not None:
      return self.body(x_MI, mods_MX, modulated=True).astype(jnp.float32)
    c = c_MD if projected else self.condition(c_MD)
    t_emb = self._time(t_M, d_M)
    if self.cfg.condition == 'separate':
      mods = c + self.time_modulation(jax.nn.silu(t_emb))
      return self.body(x_MI, mods, modulated=True).astype(jnp.float32)
    return self.body(x_MI, t_emb + c).astype(jnp.float32)

  def x1(self, x_t_MZ: Array, t_M: Array, c_MD: Array,
         x1_prev_MZ: Array | None = None, *, projected: bool = False,
         mods_MX: Array | None = None, d_M: Array | None = None) -> Array:
    """The prediction of x1, whatever the head is trained to output."""
    out_MZ = self(x_t_MZ, t_M, c_MD, x1_prev_MZ, projected=projected, mods_MX=mods_MX,
                  d_M=d_M)
    if self.cfg.predict == 'x1':
      return out_MZ
    return x_t_MZ + (1.0 - t_M)[:, None] * out_MZ  # x1 = x_t + (1 - t)·v


def shortcut_loss(head: FlowHead, x1_MZ: Array, c_MD: Array, rng: Array,
                  noise_std: float) -> Array:
  """The shortcut head's self-consistency (Frans et al. 2024, "One Step Diffusion
  via Shortcut Models"), in x1's units: from x_t on the straight path, one step of
  size 2d must land where two of the head's own steps of size d land (no gradient
  through those); steps of the smallest size d = 1/S are the flow's (d = 0). t lies
  on the grid of 2d, so that t + 2d ≤ 1. The mean squared error, one draw per row."""
  S = head.cfg.shortcut_from
  k_rng, t_rng, noise_rng = jax.random.split(rng, 3)
  M = x1_MZ.shape[0]
  two_d = 2.0 ** -jax.random.randint(k_rng, (M,), 0, S.bit_length() - 1).astype(
      jnp.float32)  # 1, 1/2, …, 2/S
  d = two_d / 2
  t = jnp.floor(jax.random.uniform(t_rng, (M,)) / two_d) * two_d
  x0_MZ = noise_std * jax.random.normal(noise_rng, x1_MZ.shape, jnp.float32)
  x_t_MZ = (1 - t)[:, None] * x0_MZ + t[:, None] * x1_MZ
  c_MW = head.condition(c_MD)
  d_half = jnp.where(d * S < 1.5, 0.0, d)  # 1/S: the flow's own steps
  lerp = lambda x, x1, t, t_next: x + ((t_next - t) / (1 - t))[:, None] * (x1 - x)
  x_mid = lerp(x_t_MZ, head.x1(x_t_MZ, t, c_MW, projected=True, d_M=d_half), t, t + d)
  x_end = lerp(x_mid, head.x1(x_mid, t + d, c_MW, projected=True, d_M=d_half),
               t + d, t + two_d)
  # The x1 whose one step of 2d from x_t lands on x_end.
  target_MZ = jax.lax.stop_gradient(
      x_t_MZ + ((1 - t) / two_d)[:, None] * (x_end - x_t_MZ))
  pred_MZ = head.x1(x_t_MZ, t, c_MW, projected=True, d_M=two_d)
  return jnp.mean(jnp.square(pred_MZ - target_MZ))


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
