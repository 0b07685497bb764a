"""Samplers of the flow: noise x0 → latents x1 along the straight path of
`tokcom_jax.models.flow`, in `steps` Euler steps on the grid of `flow.grid_time`.

- `euler_sample`: every chunk at once (order 'parallel'), with held chunks and a
  `refine` of each prediction;
- `chunkwise_sample`: one chunk after another, each from the finished ones (order
  'chunkwise'), a full model pass per step; `cached_chunkwise_sample` the same with a
  KV cache over finished chunks (the model's `decode`);
- `head_sample`: a chunk generator's sequence (order 'head'): one trunk step per
  chunk, the head's steps, the chunk decoded and fed back;
- `generate` picks one of the first three by the flow's order; `prefix_guidance` makes the `refine` that
  steers a chunk toward the known first tokens of a prompt that ends inside it.

Every sampler moves x_t by the same update, `euler_step`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tokcom_jax.models import flow, stacks

Array = jax.Array
# (x_t [B,N,Z], t [B], previous x1 estimate [B,N,Z]) -> x1_pred [B,N,Z]
PredictX1 = Callable[[Array, Array, Array], Array]
PREFIX_GUIDANCE_STEPS = 8  # gradient steps per Euler step toward a partial chunk
PREFIX_GUIDANCE_STEP = 0.25  # their length, as a share of the prompt latents' RMS


def step_times(i, steps, shift: float) -> tuple[Array, Array]:
  """(t, t') of Euler step i of `steps` on the sampler's grid."""
  return flow.grid_time(i, steps, shift), flow.grid_time(i + 1, steps, shift)


def euler_step(x_t: Array, x1_pred: Array, t, t_next) -> Array:
  """x_t moved from t to t' toward the predicted x1 along the straight path:
  x_t + (t'-t)·(x1_pred - x_t)/(1-t), written as a lerp of weight r = (t'-t)/(1-t) so
  that the last step (r = 1) lands exactly on x1_pred."""
  r = (t_next - t) / (1.0 - t)
  return (1.0 - r) * x_t + r * x1_pred


def prefix_guidance(prefix_ce: Callable[[Array], Array], size: Array,
                    partial_BN1: Array) -> Callable[[Array], Array]:
  """A `refine` that moves each prediction of x1 [B, N, Z], by
  `PREFIX_GUIDANCE_STEPS` normalized gradient steps of length
  `PREFIX_GUIDANCE_STEP`·`size` on the chunks of `partial_BN1` only, down
  `prefix_ce(x1)`: the cross-entropy of a prompt's known first tokens of a chunk
  under the decoder."""
  def refine(x1_BNZ):
    for _ in range(PREFIX_GUIDANCE_STEPS):
      g = jax.grad(prefix_ce)(x1_BNZ) * partial_BN1
      norm = jnp.sqrt(jnp.sum(jnp.square(g), -1, keepdims=True)) + 1e-12
      x1_BNZ = x1_BNZ - PREFIX_GUIDANCE_STEP * size * g / norm
    return x1_BNZ
  return refine


def euler_sample(predict_x1: PredictX1, x0_BNZ: Array, steps: int | Array, *,
                 shift: float = 1.0, known_mask_BN: Array | None = None,
                 known_BNZ: Array | None = None,
                 refine: Callable[[Array], Array] | None = None) -> Array:
  """Integrates the flow from t=0 to t=1 in `steps` Euler steps on the grid of
  `grid_time` (uniform when shift = 1).

  Each step is `euler_step` toward the predicted x1. The predictor is called as
  predict_x1(x_t, t, x1_prev) with the previous step's estimate (zeros at the first
  step): self-conditioning models read it, others ignore it.

  `steps` may be a traced integer: one compiled sampler serves any step count.
  With `known_mask_BN` (True = held) and `known_BNZ`, held chunks follow their own
  interpolation path (1-t)·x0 + t·known and end exactly at `known`. `refine` maps
  each prediction of x1 before the step (guidance toward a condition).
  """
  B = x0_BNZ.shape[0]
  steps = jnp.asarray(steps, jnp.int32)
  held = None if known_mask_BN is None else known_mask_BN[..., None]

  def hold(x_BNZ, t):
    if held is None:
      return x_BNZ
    on_path = flow.interpolate(x0_BNZ, known_BNZ, jnp.full((B,), t))
    return jnp.where(held, on_path, x_BNZ)

  def step(i, carry):
    x_BNZ, x1_prev_BNZ = carry
    t, t_next = step_times(i, steps, shift)
    x1_pred_BNZ = predict_x1(x_BNZ, jnp.full((B,), t), x1_prev_BNZ)
    if refine is not None:
      x1_pred_BNZ = refine(x1_pred_BNZ)
    return hold(euler_step(x_BNZ, x1_pred_BNZ, t, t_next), t_next), x1_pred_BNZ

  x_BNZ, _ = jax.lax.fori_loop(0, steps, step,
                               (hold(x0_BNZ, 0.0), jnp.zeros_like(x0_BNZ)))
  return x_BNZ


def chunkwise_sample(model, x0_BNZ: Array, steps: int | Array, *, shift: float = 1.0,
                     known_mask_BN: Array | None = None,
                     known_BNZ: Array | None = None,
                     refine: Callable[[Array], Array] | None = None,
                     refine_chunks_N: Array | None = None) -> Array:
  """Generates a chunkwise (causal) model's latents one chunk after another: chunk n
  by `steps` Euler steps from its noise x0[:, n] (the grid and step of
  `euler_sample`), the model reading the finished chunks < n as clean latents
  (t = 1) and its own estimate of chunk n as the previous x1.

  Held chunks (`known_mask_BN`) are taken as given, without steps; `refine` maps
  each prediction of x1 (guidance toward a condition), as in `euler_sample`, while
  a chunk of `refine_chunks_N` (default: all) is generated: the steps of the others
  keep only their own chunk's prediction, which a refine of other chunks leaves as is.
  """
  B, N, Z = x0_BNZ.shape
  steps = jnp.asarray(steps, jnp.int32)
  held_BN = (jnp.zeros((B, N), bool) if known_mask_BN is None
             else jnp.asarray(known_mask_BN, bool))
  known_BNZ = jnp.zeros_like(x0_BNZ) if known_BNZ is None else known_BNZ
  chunk_N = jnp.arange(N)

  def one_chunk(n, clean_BNZ):
    at_N1 = (chunk_N == n)[:, None]
    # Finished chunks at t = 1, this one at t, later ones (never read) at 0.
    time_BN = lambda t: jnp.broadcast_to(
        jnp.where(chunk_N < n, 1.0, jnp.where(chunk_N == n, t, 0.0)), (B, N))

    def step(i, carry):
      x_BZ, x1_prev_BZ = carry
      t, t_next = step_times(i, steps, shift)
      x1_BNZ = model(jnp.where(at_N1, x_BZ[:, None], clean_BNZ), time_BN(t),
                     jnp.where(at_N1, x1_prev_BZ[:, None], clean_BNZ), clean_BNZ)
      if refine is not None:
        x1_BNZ = (refine(x1_BNZ) if refine_chunks_N is None else jax.lax.cond(
            refine_chunks_N[n], refine, lambda x: x, x1_BNZ))
      x1_pred_BZ = jax.lax.dynamic_index_in_dim(x1_BNZ, n, 1, keepdims=False)
      return euler_step(x_BZ, x1_pred_BZ, t, t_next), x1_pred_BZ

    held_B = jax.lax.dynamic_index_in_dim(held_BN, n, 1, keepdims=False)
    x0_BZ = jax.lax.dynamic_index_in_dim(x0_BNZ, n, 1, keepdims=False)
    todo = jnp.where(jnp.all(held_B), 0, steps)  # a chunk every row holds: no steps
    x_BZ, _ = jax.lax.fori_loop(0, todo, step, (x0_BZ, jnp.zeros_like(x0_BZ)))
    known_BZ = jax.lax.dynamic_index_in_dim(known_BNZ, n, 1, keepdims=False)
    x_BZ = jnp.where(held_B[:, None], known_BZ, x_BZ)
    return jax.lax.dynamic_update_index_in_dim(clean_BNZ, x_BZ, n, 1)

  return jax.lax.fori_loop(0, N, one_chunk, jnp.zeros_like(x0_BNZ))


def cached_chunkwise_sample(model, x0_BNZ: Array, steps: int | Array, *,
                            shift: float = 1.0, known_mask_BN: Array | None = None,
                            known_BNZ: Array | None = None) -> Array:
  """`chunkwise_sample` (no `refine`) with a KV cache: each Euler step runs the model
  (`.decode`) on chunk n alone over the keys/values the finished chunks left in the
  cache; one more pass per chunk, its final latent at t = 1, writes them."""
  B, N, _ = x0_BNZ.shape
  steps = jnp.asarray(steps, jnp.int32)
  held_BN = (jnp.zeros((B, N), bool) if known_mask_BN is None
             else jnp.asarray(known_mask_BN, bool))
  known_BNZ = jnp.zeros_like(x0_BNZ) if known_BNZ is None else known_BNZ
  at = lambda a_BN, n: jax.lax.dynamic_index_in_dim(a_BN, n, 1, keepdims=False)

  def one_chunk(n, carry):
    clean_BNZ, caches = carry
    decode = lambda x_BZ, t, prev_BZ, caches: model.decode(
        x_BZ[:, None], jnp.full((B, 1), t), prev_BZ[:, None], clean_BNZ, caches, n)

    def step(i, carry):
      x_BZ, x1_prev_BZ, caches = carry
      t, t_next = step_times(i, steps, shift)
      x1_B1Z, caches = decode(x_BZ, t, x1_prev_BZ, caches)
      return euler_step(x_BZ, x1_B1Z[:, 0], t, t_next), x1_B1Z[:, 0], caches

    held_B, x0_BZ = at(held_BN, n), at(x0_BNZ, n)
    todo = jnp.where(jnp.all(held_B), 0, steps)  # a chunk every row holds: no steps
    x_BZ, _, caches = jax.lax.fori_loop(0, todo, step,
                                        (x0_BZ, jnp.zeros_like(x0_BZ), caches))
    x_BZ = jnp.where(held_B[:, None], at(known_BNZ, n), x_BZ)
    _, caches = decode(x_BZ, 1.0, x_BZ, caches)  # as the later chunks read it
    return jax.lax.dynamic_update_index_in_dim(clean_BNZ, x_BZ, n, 1), caches

  return jax.lax.fori_loop(0, N, one_chunk, (jnp.zeros_like(x0_BNZ),
                                             model.init_cache(B, N)))[0]


def generate(model, x0_BNZ: Array, steps: int | Array, cfg: flow.FlowConfig, **kwargs
             ) -> Array:
  """Latents (in the flow's units) from noise x0, in the order of `cfg.order`;
  keyword arguments as `euler_sample`'s (held chunks, `refine`), and
  `refine_chunks_N`, the chunks `refine` moves (chunkwise: the others skip it). A
  flow model (not a bare function) runs as a loop over its layers, and chunkwise
  without `refine` with its KV cache."""
  if isinstance(model, nnx.Module):
    model = stacks.as_loop(model)  # its weights sliced once, not at every step
  if cfg.order == 'chunkwise':
    if kwargs.get('refine') is None and isinstance(model, nnx.Module):
      kwargs = {k: v for k, v in kwargs.items() if k in ('known_mask_BN', 'known_BNZ')}
      return cached_chunkwise_sample(model, x0_BNZ, steps, shift=cfg.sample_shift,
                                     **kwargs)
    return chunkwise_sample(model, x0_BNZ, steps, shift=cfg.sample_shift, **kwargs)
  kwargs.pop('refine_chunks_N', None)  # all chunks at once: every step refines
  return euler_sample(model, x0_BNZ, steps, shift=cfg.sample_shift, **kwargs)


MAX_UNROLLED_STEPS = 32  # beyond, compiling an unrolled grid costs more than it saves


def head_latents(model, h_MD: Array, x0_MZ: Array, steps: int | Array, key: Array, *,
                 shift: float = 1.0, refine: Callable[[Array], Array] | None = None
                 ) -> Array:
  """Latents [M, Z] (the flow's units) that a chunk generator's head draws from
  trunk states h [M, D]: `steps` Euler steps from x0 with a flow head (the state's
  projection computed once), each x1 prediction mapped by `refine`; one pass from
  uniform noise drawn from `key` with an energy head."""
  if model.cfg.head.kind == 'energy':
    return model.head(jax.random.uniform(key, x0_MZ.shape) - 0.5, h_MD)
  c_MW = model.head.condition(h_MD)
  # A short fixed grid is unrolled, every step's modulations from one matmul; a long
  # one (or a traced step count) is a loop.
  unrolled = isinstance(steps, int) and steps <= MAX_UNROLLED_STEPS
  if unrolled:
    mods_S = model.head.modulations(flow.grid_time(jnp.arange(steps), steps, shift),
                                    c_MW, model.head.step_size(steps))

  def step(i, carry):
    x_MZ, x1_prev_MZ = carry
    t, t_next = step_times(i, steps, shift)
    x1_MZ = model.head.x1(x_MZ, jnp.full((1,), t), c_MW, x1_prev_MZ, projected=True,
                          mods_MX=mods_S[i] if unrolled else None)
    if refine is not None:
      x1_MZ = refine(x1_MZ)
    return euler_step(x_MZ, x1_MZ, t, t_next), x1_MZ

  carry = (x0_MZ, jnp.zeros_like(x0_MZ))
  if unrolled:  # one program, the grid's times constants
    for i in range(steps):
      carry = step(i, carry)
    return carry[0]
  return jax.lax.fori_loop(0, steps, step, carry)[0]


def head_sample(model, decode: Callable[[Array, Array], Array], x0_BNZ: Array,
                steps: int | Array, key: Array, *, shift: float = 1.0,
                known_mask_BN: Array | None = None, known_BNZ: Array | None = None,
                known_tokens_BL: Array | None = None,
                known_token_mask_BL: Array | None = None,
                refine: Callable[[Array, Array], Array] | None = None,
                refine_chunks_N: Array | None = None,
                on_chunk: Callable[[Array], None] | None = None) -> tuple[Array, Array]:
  """A chunk generator's sequence (`generator.ChunkGenerator`), one chunk after
  another, all in one loop: a trunk step over the KV cache of the chunks before
  gives the state h_n; the head turns it into chunk n's latent (`steps` Euler steps
  from x0[:, n] with a flow head; one pass from uniform noise drawn from `key` with
  an energy head); `decode(z_BTZ, n_T)` (VAE latents of the chunks n_T → token ids
  [B, T, K]) gives the chunk's tokens; the trunk reads them (or the latent) at the
  next step. A trunk that reads latents needs no tokens inside the loop: all chunks
  are decoded in one call after it (`decode` must give chunk n the same tokens
  either way, e.g. its draws keyed by n).

  Held chunks (`known_mask_BN`, latents `known_BNZ` in the flow's units) take their
  latent as given; held tokens (`known_token_mask_BL`, ids `known_tokens_BL`, e.g. a
  prompt ending inside a chunk) replace the decoded ones, so the next chunk reads
  them. `refine(x1_BZ, n)` maps each prediction of x1 while the chunks of
  `refine_chunks_N` are drawn. `on_chunk(n)` is called on the host after each
  chunk (a progress bar). Returns (latents [B, N, Z] in the flow's units, token ids
  [B, N·K]).
  """
  B, N, Z = x0_BNZ.shape
  K = model.cfg.chunk_size
  decode_after = model.cfg.head.input != 'tokens'
  held_BN = (jnp.zeros((B, N), bool) if known_mask_BN is None
             else jnp.asarray(known_mask_BN, bool))
  known_BNZ = jnp.zeros_like(x0_BNZ) if known_BNZ is None else known_BNZ
  held_BNK = (jnp.zeros((B, N, K), bool) if known_token_mask_BL is None
              else jnp.asarray(known_token_mask_BL, bool).reshape(B, N, K))
  known_BNK = (jnp.zeros((B, N, K), jnp.int32) if known_tokens_BL is None
               else jnp.asarray(known_tokens_BL, jnp.int32).reshape(B, N, K))
  at = lambda a, n: jax.lax.dynamic_index_in_dim(a, n, 1, keepdims=False)

  def draw(n, h_BD):
    """Chunk n's latent from the state h_n."""
    chunk_refine = None
    if refine is not None:
      chunk_refine = lambda x1_BZ: (refine(x1_BZ, n) if refine_chunks_N is None else
                                    jax.lax.cond(refine_chunks_N[n], refine,
                                                 lambda x, n: x, x1_BZ, n))
    return head_latents(model, h_BD, at(x0_BNZ, n), steps, jax.random.fold_in(key, n),
                        shift=shift, refine=chunk_refine)

  def one_chunk(n, carry):
    input_B1D, caches, x_BNZ, tokens_BNK = carry
    h_B1D, caches = model.step(input_B1D, caches, n)
    h_BD = h_B1D[:, 0].astype(jnp.float32)
    if known_mask_BN is None:  # nothing held: no branch (it would split the fusions)
      x_BZ = draw(n, h_BD)
    else:
      held_B = at(held_BN, n)
      x_BZ = jax.lax.cond(jnp.all(held_B), lambda n, h: jnp.zeros((B, Z)), draw, n, h_BD)
      x_BZ = jnp.where(held_B[:, None], at(known_BNZ, n), x_BZ)
    chunk_BK = tokens_BNK[:, 0]  # unread by a trunk that reads latents
    if not decode_after:
      chunk_BK = jnp.where(at(held_BNK, n), at(known_BNK, n),
                           decode(model.to_latent(x_BZ)[:, None], n[None])[:, 0]
                           .astype(jnp.int32))
      tokens_BNK = jax.lax.dynamic_update_index_in_dim(tokens_BNK, chunk_BK, n, 1)
    input_B1D = model.chunk_input(chunk_BK[:, None], x_BZ[:, None])
    if on_chunk is not None:
      jax.debug.callback(on_chunk, n, ordered=True)
    return (input_B1D, caches, jax.lax.dynamic_update_index_in_dim(x_BNZ, x_BZ, n, 1),
            tokens_BNK)

  init = (model.start_input(B), model.init_cache(B, N), jnp.zeros_like(x0_BNZ),
          jnp.zeros((B, N, K), jnp.int32))
  _, _, x_BNZ, tokens_BNK = jax.lax.fori_loop(0, N, one_chunk, init)
  if decode_after:
    tokens_BNK = jnp.where(held_BNK, known_BNK, decode(
        model.to_latent(x_BNZ), jnp.arange(N)).astype(jnp.int32))
  return x_BNZ, tokens_BNK.reshape(B, N * K)
