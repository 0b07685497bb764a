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
sampler runs `steps` Euler steps per chunk (`samplers.chunkwise_sample`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from tokcom_jax.models.token_metrics import reconstruction_metrics

Array = jax.Array


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
  metrics = reconstruction_metrics(
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
