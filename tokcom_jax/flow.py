"""Flow matching between Gaussian noise x0 and clean latents x1: pure functions.

The path is x_t = (1-t)·x0 + t·x1 with x0 ~ N(0, noise_std²) and t ∈ [0, 1] (t = 1 is
data). The model predicts x1 directly; the velocity at (x_t, t) is
(x1_pred - x_t)/(1 - t).

The flow runs on latents in the model's own units: with `standardize`, the VAE
latents minus their per-dimension mean, over their per-dimension std (measured on
training windows when stage 2 starts and kept in the flow model), so that
`noise_std = 1` is noise at the latents' own scale. `t_shift` s > 1 moves training
times toward the noisy end, where a sequence's content is decided: the noise
fraction σ = 1 - t becomes s·σ / (1 + (s-1)·σ) (SD3's shift); `sample_shift` does the
same to the sampler's grid. They are separate because the best grid depends on the
noise scale: with the exact predictor of Gaussian data, a 50-step uniform grid keeps
95% of the data's variance at noise_std = 1 but 81% at v5.2's noise (0.05 against
latents of std 0.6), where a grid shifted by 12 keeps 95% (tests/test_flow.py).

`order` says how a sequence's latents are generated. 'parallel' (v5.2): all chunks
at once, one time t per sequence, one ODE over the whole [N, Z]. 'chunkwise': one
chunk after another, each from the clean chunks before it (a causal model, dit.py);
training draws a time per chunk and learns every chunk's conditional at once, the
sampler runs `steps` Euler steps per chunk (`chunkwise_sample`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tokcom_jax import stacks, vae as vae_lib

Array = jax.Array
# (x_t [B,N,Z], t [B], previous x1 estimate [B,N,Z]) -> x1_pred [B,N,Z]
PredictX1 = Callable[[Array, Array, Array], Array]


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  noise_std: float = 0.05
  t_schedule: str = 'uniform'  # or 'logit_normal'
  t_mean: float = 0.0
  t_std: float = 1.0
  t_shift: float = 1.0  # > 1: more training time at high noise
  sample_shift: float = 1.0  # the same for the sampler's time grid
  ce_weight: float = 1.0
  ce_min_t: float = 0.0  # the CE term only where t >= ce_min_t (training)
  mse_weight: float = 1.0
  standardize: bool = False  # flow on per-dimension standardized latents
  self_condition: bool = False  # the previous x1 estimate as an extra input
  order: str = 'parallel'  # or 'chunkwise' (module docstring)

  @classmethod
  def from_config(cls, config) -> 'FlowConfig':
    return cls(**config.flow.to_dict())


def _per_example(t: Array, like: Array) -> Array:
  """t [B] (one per example) or [B, N] (one per chunk) broadcastable to `like`."""
  return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


def interpolate(x0: Array, x1: Array, t_B: Array) -> Array:
  t = _per_example(t_B, x0)
  return (1 - t) * x0 + t * x1


def sample_noise(rng: Array, shape, noise_std: float) -> Array:
  return noise_std * jax.random.normal(rng, shape, jnp.float32)


def shift_t(t: Array, shift: float) -> Array:
  """t with its noise fraction σ = 1 - t moved to s·σ / (1 + (s-1)·σ): 0 and 1 stay,
  the order stays, and s > 1 spends more of [0, 1] at high noise."""
  if shift == 1.0:
    return t
  sigma = 1.0 - t
  return 1.0 - shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sample_t(rng: Array, batch_size: int, schedule: str = 'uniform',
             mean: float = 0.0, std: float = 1.0, shift: float = 1.0) -> Array:
  """t ~ U[0, 1], or logit-normal: sigmoid(N(mean, std²)) (SD3's choice); then
  shifted by `shift` (see `shift_t`)."""
  if schedule == 'uniform':
    t = jax.random.uniform(rng, (batch_size,))
  elif schedule == 'logit_normal':
    t = jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch_size,)))
  else:
    raise ValueError(f"unknown t schedule {schedule!r}: use 'uniform' or"
                     " 'logit_normal'.")
  return shift_t(t, shift)


def grid_time(i, steps, shift: float = 1.0) -> Array:
  """Time i of the sampler's grid t_0 = 0 < … < t_steps = 1: uniform in i, shifted
  like training times so that the steps fall where training looked."""
  return shift_t(jnp.asarray(i, jnp.float32) / jnp.asarray(steps, jnp.float32), shift)


def loss_fn(x1_pred_BNZ: Array, x1_BNZ: Array, tokens_BL: Array, mask_BL: Array,
            decode: Callable[[Array], Array], *, ce_weight: float = 1.0,
            mse_weight: float = 1.0, ce_mask_B: Array | None = None
            ) -> tuple[Array, dict[str, Array]]:
  """Stage-2 loss: ce_weight·CE(decode(x1_pred), tokens) + mse_weight·MSE(x1_pred, x1).

  `decode` is the frozen VAE decoder (from the flow's units); gradients flow through
  its activations into x1_pred, never into its parameters. `ce_mask_B` keeps the CE
  term to some examples (the CE and accuracy metrics are then over those only).
  """
  if ce_mask_B is not None and ce_mask_B.ndim == 2:  # per chunk: per token
    ce_mask_B = jnp.repeat(ce_mask_B, tokens_BL.shape[1] // x1_BNZ.shape[1], axis=1)
  mask = mask_BL if ce_mask_B is None else mask_BL * _per_example(ce_mask_B, mask_BL)
  # With no CE weight the decoder runs for the metrics only: no backward through it.
  decoded = x1_pred_BNZ if ce_weight else jax.lax.stop_gradient(x1_pred_BNZ)
  metrics = vae_lib.reconstruction_metrics(
      decode(decoded), tokens_BL, mask, chunk_size=tokens_BL.shape[1] // x1_BNZ.shape[1])
  metrics['mse'] = jnp.mean(jnp.square(x1_pred_BNZ - x1_BNZ))
  metrics['loss'] = mse_weight * metrics['mse'] + ce_weight * metrics['ce']
  return metrics['loss'], metrics


def noised_prediction(model, x1_BNZ: Array, rng: Array, cfg: FlowConfig,
                      t_B: Array | None = None) -> tuple[Array, Array]:
  """(x1 prediction, t) for x1 [B, N, Z] noised to times from `rng` (or `t_B`); a
  chunkwise model gets a time per chunk and reads the clean chunks before each; with
  self-conditioning half the examples see the model's own (stop-gradient) estimate of
  x1, the rest zeros. Gradients reach x1 (stage 1's latent prior uses them)."""
  B, N, _ = x1_BNZ.shape
  chunkwise = cfg.order == 'chunkwise'
  noise_rng, t_rng, sc_rng = jax.random.split(rng, 3)
  x0_BNZ = sample_noise(noise_rng, x1_BNZ.shape, cfg.noise_std)
  if t_B is None:
    t_B = sample_t(t_rng, B * N if chunkwise else B, cfg.t_schedule, cfg.t_mean,
                   cfg.t_std, cfg.t_shift)
    t_B = t_B.reshape(B, N) if chunkwise else t_B
  elif chunkwise:
    t_B = jnp.broadcast_to(t_B[:, None], (B, N))
  clean = dict(clean_BNZ=x1_BNZ) if chunkwise else {}
  x_t_BNZ = interpolate(x0_BNZ, x1_BNZ, t_B)
  x1_prev_BNZ = jnp.zeros_like(x_t_BNZ)
  if cfg.self_condition:
    estimate = jax.lax.stop_gradient(model(x_t_BNZ, t_B, x1_prev_BNZ, **clean))
    use_B = jax.random.bernoulli(sc_rng, 0.5, (B,))
    x1_prev_BNZ = jnp.where(_per_example(use_B, estimate), estimate, 0.0)
  return model(x_t_BNZ, t_B, x1_prev_BNZ, **clean), t_B


def diffusion_loss_fn(model, vae_model, tokens_BL: Array, mask_BL: Array, rng: Array,
                      cfg: FlowConfig, t_B: Array | None = None
                      ) -> tuple[Array, dict[str, Array]]:
  """The stage-2 objective of a batch: x1 = the frozen VAE's posterior mean in the
  flow's units (the CE term always computed at evaluation's fixed times)."""
  mean_BNZ, _ = vae_model.encode(tokens_BL)
  x1_BNZ = model.to_flow(jax.lax.stop_gradient(mean_BNZ))
  sampled_t = t_B is None
  x1_pred_BNZ, t_B = noised_prediction(model, x1_BNZ, rng, cfg, t_B)
  ce_mask_B = ((t_B >= cfg.ce_min_t).astype(jnp.float32)
               if sampled_t and cfg.ce_min_t > 0 else None)
  if ce_mask_B is None and sampled_t and not cfg.ce_weight:
    # Plain flow matching: no decoder pass in the training step (CE at evaluation).
    mse = jnp.mean(jnp.square(x1_pred_BNZ - x1_BNZ))
    return cfg.mse_weight * mse, {'mse': mse, 'loss': cfg.mse_weight * mse}
  return loss_fn(x1_pred_BNZ, x1_BNZ, tokens_BL, mask_BL,
                 lambda x: vae_model.decode(model.to_latent(x), tokens_BL),
                 ce_weight=cfg.ce_weight, mse_weight=cfg.mse_weight,
                 ce_mask_B=ce_mask_B)


def euler_sample(predict_x1: PredictX1, x0_BNZ: Array, steps: int | Array, *,
                 shift: float = 1.0, known_mask_BN: Array | None = None,
                 known_BNZ: Array | None = None,
                 refine: Callable[[Array], Array] | None = None) -> Array:
  """Integrates the flow from t=0 to t=1 in `steps` Euler steps on the grid of
  `grid_time` (uniform when shift = 1).

  Each step moves x_t toward the predicted x1 along the straight path:
  x_{t'} = x_t + (t'-t)·(x1_pred - x_t)/(1-t), written as a lerp with weight
  r = (t'-t)/(1-t) so that the last step (r = 1) lands exactly on x1_pred. The
  predictor is called as predict_x1(x_t, t, x1_prev) with the previous step's
  estimate (zeros at the first step): self-conditioning models read it, others
  ignore it.

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
    on_path = interpolate(x0_BNZ, known_BNZ, jnp.full((B,), t))
    return jnp.where(held, on_path, x_BNZ)

  def step(i, carry):
    x_BNZ, x1_prev_BNZ = carry
    t, t_next = grid_time(i, steps, shift), grid_time(i + 1, steps, shift)
    x1_pred_BNZ = predict_x1(x_BNZ, jnp.full((B,), t), x1_prev_BNZ)
    if refine is not None:
      x1_pred_BNZ = refine(x1_pred_BNZ)
    r = (t_next - t) / (1.0 - t)
    return hold((1.0 - r) * x_BNZ + r * x1_pred_BNZ, t_next), x1_pred_BNZ

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
      t, t_next = grid_time(i, steps, shift), grid_time(i + 1, steps, shift)
      x1_BNZ = model(jnp.where(at_N1, x_BZ[:, None], clean_BNZ), time_BN(t),
                     jnp.where(at_N1, x1_prev_BZ[:, None], clean_BNZ), clean_BNZ)
      if refine is not None:
        x1_BNZ = (refine(x1_BNZ) if refine_chunks_N is None else jax.lax.cond(
            refine_chunks_N[n], refine, lambda x: x, x1_BNZ))
      x1_pred_BZ = jax.lax.dynamic_index_in_dim(x1_BNZ, n, 1, keepdims=False)
      r = (t_next - t) / (1.0 - t)
      return (1.0 - r) * x_BZ + r * x1_pred_BZ, x1_pred_BZ

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
      t, t_next = grid_time(i, steps, shift), grid_time(i + 1, steps, shift)
      x1_B1Z, caches = decode(x_BZ, t, x1_prev_BZ, caches)
      r = (t_next - t) / (1.0 - t)
      return (1.0 - r) * x_BZ + r * x1_B1Z[:, 0], x1_B1Z[:, 0], caches

    held_B, x0_BZ = at(held_BN, n), at(x0_BNZ, n)
    todo = jnp.where(jnp.all(held_B), 0, steps)  # a chunk every row holds: no steps
    x_BZ, _, caches = jax.lax.fori_loop(0, todo, step,
                                        (x0_BZ, jnp.zeros_like(x0_BZ), caches))
    x_BZ = jnp.where(held_B[:, None], at(known_BNZ, n), x_BZ)
    _, caches = decode(x_BZ, 1.0, x_BZ, caches)  # as the later chunks read it
    return jax.lax.dynamic_update_index_in_dim(clean_BNZ, x_BZ, n, 1), caches

  return jax.lax.fori_loop(0, N, one_chunk, (jnp.zeros_like(x0_BNZ),
                                             model.init_cache(B, N)))[0]


def generate(model, x0_BNZ: Array, steps: int | Array, cfg: FlowConfig, **kwargs
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
