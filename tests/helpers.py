"""Small shared pieces for the tests: tiny model configs and a jitted fitting loop."""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tokcom_jax.models import dit, vae


def tiny_vae_config(**kw) -> vae.VAEConfig:
  base = dict(vocab_size=256, chunk_size=4, latent_dim=16, hidden_size=64,
              encoder_layers=1, decoder_layers=1, num_heads=4, num_kv_heads=2,
              intermediate_size=128)
  base.update(kw)
  return vae.VAEConfig(**base)


def tiny_dit_config(**kw) -> dit.DiTConfig:
  base = dict(latent_dim=16, hidden_size=64, num_layers=2, num_heads=4,
              num_kv_heads=2, intermediate_size=128, time_freq_dim=32)
  base.update(kw)
  return dit.DiTConfig(**base)


def fit(model, loss_of_model, steps: int, lr: float):
  """Adam on `model`'s parameters for `steps` steps, all in one compiled loop (no
  dispatch or transfer per step); returns (model, losses)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  optimizer = optax.adam(lr)

  @jax.jit
  def run(params):
    def step(carry, _):
      params, opt_state = carry
      value, grads = jax.value_and_grad(
          lambda p: loss_of_model(nnx.merge(graphdef, p, rest))[0])(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), value
    return jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)

  (params, _), losses = run(params)
  return nnx.merge(graphdef, params, rest), [float(v) for v in losses]


@functools.cache  # fitted once per session for each (steps, config): read, never changed
def fit_tiny_vae(steps: int, **config):
  """A tiny ChunkVAE fitted to one batch of 4 random 32-token windows:
  (model, tokens, mask, losses)."""
  model = vae.ChunkVAE(tiny_vae_config(**config), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (4, 32), 0, 256)
  mask = jnp.ones_like(tokens)
  model, losses = fit(model, lambda m: vae.loss_fn(m, tokens, mask, None),
                      steps=steps, lr=3e-3)
  return model, tokens, mask, losses
