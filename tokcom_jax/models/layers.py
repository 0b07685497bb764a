"""Transformer building blocks shared by the chunk VAE and the latent flow model.

Shapes are written as suffixes: B batch, T sequence, D model width, N query heads,
K key/value heads, H head size, F MLP width, C conditioning width.

Every parameter carries logical axis names (`vocab`, `embed`, `mlp`, `heads`,
`kv_heads`, `head_dim`, `latent`, `modulation`, `freq`); `tokcom_jax.training.sharding` maps
them onto mesh axes. Eager sharding is off: placement is decided once, by the caller
that jits the initialisation with explicit output shardings.

Layer stacks are made and run by `tokcom_jax.models.stacks` (`scan_layers`, `remat`).

KV cache (autoregressive decoding, `decode` methods): per layer
`{'k': [B, S, K, H], 'v': [B, S, K, H]}` in the compute dtype, S the length of the
whole token buffer; a list of those dicts, or with `scan_layers` one dict of
[L, B, S, K, H] arrays. Slot s holds the RoPE-rotated key and the value of the token at
absolute position s. A `decode` call takes T new tokens at absolute positions
`index .. index+T-1` (T = S for a prefill from 0, T = 1 per step after), writes their
k/v into those slots and lets query position p attend to slots s <= p. Slots past
the newest token may hold anything (zeros, padding): the mask never reads them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tokcom_jax.models import ops, stacks
from tokcom_jax.models.axes import constrain_batch, partitioned

Array = jax.Array

# Qwen2 initialises every matrix from N(0, 0.02²).
default_init = nnx.initializers.normal(stddev=0.02)
zeros_init = nnx.initializers.zeros_init()
ones_init = nnx.initializers.ones_init()


@dataclasses.dataclass(frozen=True, kw_only=True)
class StackFields:
  """The fields every transformer stack of a model declares: its width, heads, MLP,
  RoPE, norm, compute dtype and layer layout. The model configs (`VAEConfig`,
  `DiTConfig`, `LMConfig`) and `TransformerConfig` extend it; keyword-only, so a
  subclass adds fields with or without defaults in any order."""

  hidden_size: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  rope_theta: float = 1_000_000.0
  rms_eps: float = 1e-6
  dtype: Any = jnp.float32  # compute dtype; parameters are always fp32
  scan_layers: bool = False  # stacked parameters, one lax.scan (stacks.make_blocks)
  remat: str = 'none'  # one of stacks.REMAT_POLICIES


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig(StackFields):
  """Shape of one Qwen2-style transformer stack."""

  num_layers: int
  causal: bool = False

  def __post_init__(self):
    if self.remat not in stacks.REMAT_POLICIES:
      raise ValueError(f'remat {self.remat!r} is not one of {stacks.REMAT_POLICIES}.')
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f'hidden_size {self.hidden_size} is not divisible by num_heads'
          f' {self.num_heads}: choose sizes with hidden_size % num_heads == 0.')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'num_heads {self.num_heads} is not divisible by num_kv_heads'
          f' {self.num_kv_heads}: grouped-query attention needs whole groups.')
    if (self.hidden_size // self.num_heads) % 2:
      raise ValueError(
          f'head size {self.hidden_size // self.num_heads} is odd: rotary'
          ' embeddings need an even head size.')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


def stack_config(model_config: StackFields, num_layers: int, causal: bool
                 ) -> TransformerConfig:
  """The transformer stack of a model config (its `StackFields`)."""
  shared = {f.name: getattr(model_config, f.name)
            for f in dataclasses.fields(StackFields)}
  return TransformerConfig(num_layers=num_layers, causal=causal, **shared)


def stack_options(config) -> dict:
  """The fields every model config takes from the top level of a tokcom_jax
  ConfigDict: compute dtype, scan_layers, remat (a loop without remat if unset)."""
  return dict(dtype=jnp.dtype(config.compute_dtype),
              scan_layers=bool(config.get('scan_layers', False)),
              remat=str(config.get('remat', 'none')))


def section_fields(cls, section) -> dict:
  """The entries of a config section that are fields of dataclass `cls`."""
  names = {f.name for f in dataclasses.fields(cls)}
  return {k: v for k, v in section.items() if k in names}


def rms_norm(features: int, cfg: TransformerConfig, *, use_scale: bool = True,
             rngs: nnx.Rngs) -> nnx.RMSNorm:
  return nnx.RMSNorm(
      features, epsilon=cfg.rms_eps, dtype=cfg.dtype, use_scale=use_scale,
      scale_init=partitioned(ones_init, 'embed'), rngs=rngs)


def dense(in_features: int, out_features: int, names: tuple[str, str], *,
          dtype, use_bias: bool = False, kernel_init=default_init,
          rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype,
      kernel_init=partitioned(kernel_init, *names),
      bias_init=partitioned(zeros_init, names[1]), rngs=rngs)


def apply_rope(x_BTNH: Array, positions_T: Array, theta: float) -> Array:
  """Rotary position embedding, rotate-half convention (as in Qwen2/Llama)."""
  half = x_BTNH.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_TH = positions_T.astype(jnp.float32)[:, None] * inv_freq[None, :]
  sin, cos = jnp.sin(angle_TH)[:, None, :], jnp.cos(angle_TH)[:, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BTNH.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE and Qwen2's q/k/v biases."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def proj(heads, heads_name):
      return nnx.Einsum(
          'BTD,DNH->BTNH', (D, heads, H), (heads, H), dtype=cfg.dtype,
          kernel_init=partitioned(default_init, 'embed', heads_name, 'head_dim'),
          bias_init=partitioned(zeros_init, heads_name, 'head_dim'), rngs=rngs)

    self.query = proj(N, 'heads')
    self.key = proj(K, 'kv_heads')
    self.value = proj(K, 'kv_heads')
    self.out = nnx.Einsum(
        'BTNH,NHD->BTD', (N, H, D), dtype=cfg.dtype,
        kernel_init=partitioned(default_init, 'heads', 'head_dim', 'embed'),
        rngs=rngs)

  def qkv(self, x_BTD: Array, positions_T: Array) -> tuple[Array, Array, Array]:
    """Queries and keys rotated for their absolute positions, and values."""
    theta = self.cfg.rope_theta
    q_BTNH = apply_rope(self.query(x_BTD), positions_T, theta)
    k_BTKH = apply_rope(self.key(x_BTD), positions_T, theta)
    return q_BTNH, k_BTKH, self.value(x_BTD)

  def __call__(self, x_BTD: Array, positions_T: Array) -> Array:
    q_BTNH, k_BTKH, v_BTKH = self.qkv(x_BTD, positions_T)
    # cuDNN flash attention on GPU, XLA elsewhere; grouped heads are native.
    o_BTNH = jax.nn.dot_product_attention(
        q_BTNH, k_BTKH, v_BTKH, is_causal=self.cfg.causal)
    return self.out(o_BTNH)

  def decode(self, x_BTD: Array, cache: dict[str, Array], index: Array,
             ) -> tuple[Array, dict[str, Array]]:
    """Causal attention of T new tokens at positions index.. over a KV cache.

    Writes the new keys/values into slots index..index+T-1 of `cache` (layout in the
    module docstring) and returns (output [B, T, D], updated cache). `index` may be
    traced, so one compiled step serves every position. Always causal: a cache only
    makes sense for a causal stack.
    """
    T, S = x_BTD.shape[1], cache['k'].shape[1]
    positions_T = index + jnp.arange(T, dtype=jnp.int32)  # absolute, for RoPE too
    q_BTNH, k_BTKH, v_BTKH = self.qkv(x_BTD, positions_T)
    k_BSKH = jax.lax.dynamic_update_slice_in_dim(
        cache['k'], k_BTKH.astype(cache['k'].dtype), index, axis=1)
    v_BSKH = jax.lax.dynamic_update_slice_in_dim(
        cache['v'], v_BTKH.astype(cache['v'].dtype), index, axis=1)
    # Query at position p sees slots s <= p: the causal mask, shifted by `index`.
    mask_TS = jnp.arange(S, dtype=jnp.int32)[None, :] <= positions_T[:, None]
    o_BTNH = jax.nn.dot_product_attention(
        q_BTNH, k_BSKH.astype(q_BTNH.dtype), v_BSKH.astype(q_BTNH.dtype),
        mask=mask_TS[None, None])
    return self.out(o_BTNH), {'k': k_BSKH, 'v': v_BSKH}


class SwiGLU(nnx.Module):
  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    D, F = cfg.hidden_size, cfg.intermediate_size
    self.gate = dense(D, F, ('embed', 'mlp'), dtype=cfg.dtype, rngs=rngs)
    self.up = dense(D, F, ('embed', 'mlp'), dtype=cfg.dtype, rngs=rngs)
    self.down = dense(F, D, ('mlp', 'embed'), dtype=cfg.dtype, rngs=rngs)

  def __call__(self, x_BTD: Array) -> Array:
    """down(silu(gate(x)) * up(x)), the backward pass written out (`ops.swiglu`)."""
    dtype = self.gate.dtype
    kernels = (m.kernel[...].astype(dtype) for m in (self.gate, self.up, self.down))
    return ops.swiglu(x_BTD.astype(dtype), *kernels)


class Block(nnx.Module):
  """Qwen2 pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.attn_norm = rms_norm(cfg.hidden_size, cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = rms_norm(cfg.hidden_size, cfg, rngs=rngs)
    self.mlp = SwiGLU(cfg, rngs=rngs)

  def __call__(self, x_BTD: Array, positions_T: Array) -> Array:
    x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), positions_T)
    return x_BTD + self.mlp(self.mlp_norm(x_BTD))

  def decode(self, x_BTD: Array, cache: dict[str, Array], index: Array,
             ) -> tuple[Array, dict[str, Array]]:
    """`__call__` for T new tokens at positions index.., attending over `cache`."""
    a_BTD, cache = self.attn.decode(self.attn_norm(x_BTD), cache, index)
    x_BTD = x_BTD + a_BTD
    return x_BTD + self.mlp(self.mlp_norm(x_BTD)), cache


def init_cache(cfg: TransformerConfig, batch: int, length: int):
  """An empty KV cache of a stack for `batch` sequences of up to `length` positions
  (layout in the module docstring)."""
  shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
  if cfg.scan_layers:
    shape = (cfg.num_layers, *shape)
    return {'k': jnp.zeros(shape, cfg.dtype), 'v': jnp.zeros(shape, cfg.dtype)}
  return [{'k': jnp.zeros(shape, cfg.dtype), 'v': jnp.zeros(shape, cfg.dtype)}
          for _ in range(cfg.num_layers)]


class Transformer(nnx.Module):
  """A stack of `Block`s followed by a final RMSNorm (a Qwen2 body without embeddings)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.blocks = stacks.make_blocks(lambda r: Block(cfg, rngs=r), cfg, rngs)
    self.final_norm = rms_norm(cfg.hidden_size, cfg, rngs=rngs)

  def __call__(self, x_BTD: Array) -> Array:
    positions_T = jnp.arange(x_BTD.shape[1])

    def layer(block, x_BTD, _):
      return constrain_batch(block(constrain_batch(x_BTD), positions_T)), None
    x_BTD, _ = stacks.apply_blocks(self.blocks, self.cfg, layer, x_BTD)
    return self.final_norm(x_BTD)

  def init_cache(self, batch: int, length: int):
    return init_cache(self.cfg, batch, length)

  def decode(self, x_BTD: Array, caches, index: Array):
    """The causal stack on T new tokens at absolute positions index..index+T-1.

    Equals `__call__` of a causal stack on the whole prefix, restricted to the new
    positions, given caches that hold the earlier positions; returns the updated
    caches (same layout) with the new positions' keys and values written in.
    """
    def layer(block, x_BTD, cache):
      x_BTD, cache = block.decode(constrain_batch(x_BTD), cache, index)
      return constrain_batch(x_BTD), cache
    x_BTD, caches = stacks.apply_blocks(self.blocks, self.cfg, layer, x_BTD, caches)
    return self.final_norm(x_BTD), caches
