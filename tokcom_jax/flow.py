"""Flow matching between Gaussian noise x0 and clean latents x1: pure functions.

The path is x_t = (1-t)·x0 + t·x1 with x0 ~ N(0, noise_std²) and t ∈ [0, 1]. The
model predicts x1 directly; the velocity at (x_t, t) is (x1_pred - x_t)/(1 - t).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from tokcom_jax import vae as vae_lib

Array = jax.Array
PredictX1 = Callable[[Array, Array], Array]  # (x_t [B,N,Z], t [B]) -> x1_pred [B,N,Z]


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  noise_std: float = 0.05
  t_schedule: str = 'uniform'  # or 'logit_normal'
  t_mean: float = 0.0
  t_std: float = 1.0
  ce_weight: float = 1.0
  mse_weight: float = 1.0

  @classmethod
  def from_config(cls, config) -> 'FlowConfig':
    return cls(**config.flow.to_dict())


def _per_example(t_B: Array, like: Array) -> Array:
  return t_B.reshape(t_B.shape + (1,) * (like.ndim - t_B.ndim))


def interpolate(x0: Array, x1: Array, t_B: Array) -> Array:
  t = _per_example(t_B, x0)
  return (1 - t) * x0 + t * x1


def sample_noise(rng: Array, shape, noise_std: float) -> Array:
  return noise_std * jax.random.normal(rng, shape, jnp.float32)


def sample_t(rng: Array, batch_size: int, schedule: str = 'uniform',
             mean: float = 0.0, std: float = 1.0) -> Array:
  """t ~ U[0, 1], or logit-normal: sigmoid(N(mean, std²)) (SD3's choice)."""
  if schedule == 'uniform':
    return jax.random.uniform(rng, (batch_size,))
  if schedule == 'logit_normal':
    return jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch_size,)))
  raise ValueError(f"unknown t schedule {schedule!r}: use 'uniform' or 'logit_normal'.")


def loss_fn(x1_pred_BNZ: Array, x1_BNZ: Array, tokens_BL: Array, mask_BL: Array,
            decode: Callable[[Array], Array], *, ce_weight: float = 1.0,
            mse_weight: float = 1.0) -> tuple[Array, dict[str, Array]]:
  """Stage-2 loss: ce_weight·CE(decode(x1_pred), tokens) + mse_weight·MSE(x1_pred, x1).

  `decode` is the frozen VAE decoder; gradients flow through its activations into
  x1_pred, never into its parameters (the caller does not differentiate them).
  """
  metrics = vae_lib.reconstruction_metrics(
      decode(x1_pred_BNZ), tokens_BL, mask_BL,
      chunk_size=tokens_BL.shape[1] // x1_BNZ.shape[1])
  metrics['mse'] = jnp.mean(jnp.square(x1_pred_BNZ - x1_BNZ))
  metrics['loss'] = ce_weight * metrics['ce'] + mse_weight * metrics['mse']
  return metrics['loss'], metrics


def diffusion_loss_fn(model, vae_model, tokens_BL: Array, mask_BL: Array, rng: Array,
                      cfg: FlowConfig, t_B: Array | None = None
                      ) -> tuple[Array, dict[str, Array]]:
  """The whole stage-2 objective for one batch of token windows.

  The frozen VAE gives x1 = its posterior mean; noise and t come from `rng` (or `t_B`
  for evaluation at fixed times); `model` predicts x1 from x_t; the loss decodes the
  prediction with the frozen decoder.
  """
  mean_BNZ, _ = vae_model.encode(tokens_BL)
  x1_BNZ = jax.lax.stop_gradient(mean_BNZ)
  noise_rng, t_rng = jax.random.split(rng)
  x0_BNZ = sample_noise(noise_rng, x1_BNZ.shape, cfg.noise_std)
  if t_B is None:
    t_B = sample_t(t_rng, x1_BNZ.shape[0], cfg.t_schedule, cfg.t_mean, cfg.t_std)
  x1_pred_BNZ = model(interpolate(x0_BNZ, x1_BNZ, t_B), t_B)
  return loss_fn(x1_pred_BNZ, x1_BNZ, tokens_BL, mask_BL, vae_model.decode,
                 ce_weight=cfg.ce_weight, mse_weight=cfg.mse_weight)


def euler_sample(predict_x1: PredictX1, x0_BNZ: Array, steps: int | Array, *,
                 known_mask_BN: Array | None = None,
                 known_BNZ: Array | None = None) -> Array:
  """Integrates the flow from t=0 to t=1 in `steps` uniform Euler steps.

  Each step moves x_t toward the predicted x1 along the straight path:
  x_{t'} = x_t + (t'-t)·(x1_pred - x_t)/(1-t), written as a lerp with weight
  r = (t'-t)/(1-t) so that the last step (r = 1) lands exactly on x1_pred.

  `steps` may be a traced integer: one compiled sampler serves any step count.
  With `known_mask_BN` (True = held) and `known_BNZ`, held chunks follow their own
  interpolation path (1-t)·x0 + t·known and end exactly at `known`.
  """
  B = x0_BNZ.shape[0]
  steps = jnp.asarray(steps, jnp.int32)
  held = None if known_mask_BN is None else known_mask_BN[..., None]

  def hold(x_BNZ, t):
    if held is None:
      return x_BNZ
    on_path = interpolate(x0_BNZ, known_BNZ, jnp.full((B,), t))
    return jnp.where(held, on_path, x_BNZ)

  def step(i, x_BNZ):
    t = jnp.asarray(i, jnp.float32) / steps
    t_next = jnp.asarray(i + 1, jnp.float32) / steps
    x1_pred_BNZ = predict_x1(x_BNZ, jnp.full((B,), t))
    r = (t_next - t) / (1.0 - t)
    return hold((1.0 - r) * x_BNZ + r * x1_pred_BNZ, t_next)

  return jax.lax.fori_loop(0, steps, step, hold(x0_BNZ, 0.0))
