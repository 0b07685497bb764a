import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import v52
from tests import helpers
from tests.test_vae import param_count, qwen2_stack_params
from tokcom_jax import dit, flow


def test_shapes_and_zero_prediction_at_init():
  model = dit.LatentFlowTransformer(helpers.tiny_dit_config(), rngs=nnx.Rngs(0))
  x_t = jax.random.normal(jax.random.key(0), (3, 8, 16))
  out = model(x_t, jnp.array([0.1, 0.5, 0.9]))
  chex.assert_shape(out, (3, 8, 16))
  np.testing.assert_array_equal(out, jnp.zeros_like(out))


def test_body_is_identity_at_init():
  model = dit.LatentFlowTransformer(helpers.tiny_dit_config(), rngs=nnx.Rngs(0))
  h = jax.random.normal(jax.random.key(0), (2, 8, 64))
  cond = model.time_embed(jnp.array([0.3, 0.7]))
  np.testing.assert_array_equal(model.body(h, cond), h)


def test_attention_is_bidirectional_over_chunks():
  model = dit.LatentFlowTransformer(helpers.tiny_dit_config(), rngs=nnx.Rngs(0))
  # Give the gates a value so that attention contributes.
  for block in model.blocks:
    block.modulation.bias[...] = jnp.ones_like(block.modulation.bias[...])
  h = jax.random.normal(jax.random.key(0), (1, 6, 64))
  cond = model.time_embed(jnp.array([0.5]))
  grad = jax.grad(lambda h: jnp.sum(model.body(h, cond)[:, 0] ** 2))(h)
  assert float(jnp.abs(grad[0, 5]).max()) > 0  # position 0 sees position 5


def test_v52_parameter_count():
  config = v52.get_config('diffusion')
  cfg = dit.DiTConfig.from_config(config)
  params = nnx.state(nnx.eval_shape(lambda: dit.LatentFlowTransformer(
      cfg, rngs=nnx.Rngs(0))), nnx.Param)
  D, Z, F, T = 896, 896, 4864, 256
  # Each adaLN-Zero block: the Qwen2 block without norm scales, plus D → 6D modulation.
  block = qwen2_stack_params(1, D, 14, 2, F) - D - 2 * D + (D * 6 * D + 6 * D)
  assert param_count(params['blocks']) == 24 * block
  extras = (Z * D + D) + (T * D + D + D * D + D) + (D * 2 * D + 2 * D + D * Z + Z)
  assert param_count(params) == 24 * block + extras


def test_flow_model_fits_one_batch_through_the_frozen_decoder():
  vae_model, tokens, mask, _ = helpers.fit_tiny_vae(steps=150)
  vae_before = jax.tree.map(jnp.copy, nnx.state(vae_model, nnx.Param))

  model = dit.LatentFlowTransformer(helpers.tiny_dit_config(), rngs=nnx.Rngs(1))
  cfg = flow.FlowConfig(noise_std=0.05)
  rng = jax.random.key(2)  # one fixed batch: the same noise and t every step
  loss = lambda m: flow.diffusion_loss_fn(m, vae_model, tokens, mask, rng, cfg)
  first = loss(model)[1]
  model, losses = helpers.fit(model, loss, steps=150, lr=3e-3)
  last = loss(model)[1]
  assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
  # The cross-entropy term, which only reaches the flow model through the decoder,
  # falls on its own: gradients flow end to end.
  assert float(last['ce']) < float(first['ce']) / 10
  chex.assert_trees_all_equal(nnx.state(vae_model, nnx.Param), vae_before)
