import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import v52
from tests import helpers
from tests.test_vae import (assert_close_to_fp32, dot_operand_dtypes, param_count,
                             qwen2_stack_params)
from tokcom_jax.models import dit, flow


def test_shapes_and_zero_prediction_at_init():
  model = dit.LatentFlowTransformer(helpers.tiny_dit_config(), rngs=nnx.Rngs(0))
  x_t = jax.random.normal(jax.random.key(0), (3, 8, 16))
  out = predict(model, x_t, jnp.array([0.1, 0.5, 0.9]))
  chex.assert_shape(out, (3, 8, 16))
  np.testing.assert_array_equal(out, jnp.zeros_like(out))


def test_body_is_identity_at_init():
  model = dit.LatentFlowTransformer(helpers.tiny_dit_config(), rngs=nnx.Rngs(0))
  h = jax.random.normal(jax.random.key(0), (2, 8, 64))
  body = nnx.jit(lambda model, h, t: model.body(h, model.time_embed(t)))
  np.testing.assert_array_equal(body(model, h, jnp.array([0.3, 0.7])), h)


def test_attention_is_bidirectional_over_chunks():
  model = dit.LatentFlowTransformer(helpers.tiny_dit_config(), rngs=nnx.Rngs(0))
  # Give the gates a value so that attention contributes.
  for block in model.blocks:
    block.modulation.bias[...] = jnp.ones_like(block.modulation.bias[...])
  h = jax.random.normal(jax.random.key(0), (1, 6, 64))

  @nnx.jit
  def grad_of_position_0(model, h):
    cond = model.time_embed(jnp.array([0.5]))
    return jax.grad(lambda h: jnp.sum(model.body(h, cond)[:, 0] ** 2))(h)
  grad = grad_of_position_0(model, h)
  assert float(jnp.abs(grad[0, 5]).max()) > 0  # position 0 sees position 5


def randomize_params(model, seed=42, stddev=0.1):
  """Replaces every parameter by N(0, stddev²) values: adaLN-Zero's zeros included."""
  rng = np.random.default_rng(seed)
  nnx.update(model, jax.tree.map(
      lambda x: jnp.asarray(stddev * rng.standard_normal(x.shape), x.dtype),
      nnx.state(model, nnx.Param)))


@nnx.jit
def predict(model, x_t_BNZ, t_B):
  return model(x_t_BNZ, t_B)


def test_prediction_depends_on_t_through_the_time_embedding():
  model = dit.LatentFlowTransformer(helpers.tiny_dit_config(), rngs=nnx.Rngs(0))
  randomize_params(model)

  @nnx.jit
  def prediction_and_grad(model, x_t_BNZ, t_B):
    grad_B = jax.grad(lambda t_B: model(x_t_BNZ, t_B).sum())(t_B)
    return model(x_t_BNZ, t_B), grad_B

  x_t_1NZ = jax.random.normal(jax.random.key(0), (1, 4, 16))
  x_t_BNZ = jnp.concatenate([x_t_1NZ, x_t_1NZ])  # one x_t at two times
  out_BNZ, grad_B = prediction_and_grad(model, x_t_BNZ, jnp.array([0.1, 0.9]))
  change = float(jnp.abs(out_BNZ[0] - out_BNZ[1]).mean())
  size = float(jnp.abs(out_BNZ).mean())
  assert change > 0.05 * size, (change, size)  # measured: ~20%
  # The output is differentiable in t, and t moves it (the sinusoids of 1000·t are fast).
  assert bool(jnp.all(jnp.isfinite(grad_B))), grad_B
  assert float(jnp.abs(grad_B).min()) > 1.0, grad_B  # measured: ~100s
  # Each example is conditioned on its own t: swapping the times swaps the outputs.
  swapped_BNZ, _ = prediction_and_grad(model, x_t_BNZ, jnp.array([0.9, 0.1]))
  np.testing.assert_allclose(swapped_BNZ, out_BNZ[::-1], rtol=1e-5, atol=1e-5)


def test_bf16_compute_matches_fp32_with_the_same_parameters():
  fp32 = dit.LatentFlowTransformer(helpers.tiny_dit_config(), rngs=nnx.Rngs(0))
  randomize_params(fp32)  # at init the prediction is exactly zero
  bf16 = dit.LatentFlowTransformer(helpers.tiny_dit_config(dtype=jnp.bfloat16),
                                   rngs=nnx.Rngs(1))
  # Parameters stay fp32 whatever the compute dtype (checked before the copy, which
  # would replace them by fp32 arrays).
  assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {
      jnp.dtype(jnp.float32)}
  nnx.update(bf16, nnx.state(fp32, nnx.Param))
  params = nnx.state(bf16, nnx.Param)
  chex.assert_trees_all_equal(params, nnx.state(fp32, nnx.Param))
  x_t_BNZ = jax.random.normal(jax.random.key(0), (2, 4, 16))
  t_B = jax.random.uniform(jax.random.key(1), (2,))
  assert_close_to_fp32(predict(bf16, x_t_BNZ, t_B), predict(fp32, x_t_BNZ, t_B))
  assert dot_operand_dtypes(bf16, x_t_BNZ, t_B) == {'bfloat16'}


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


@pytest.mark.parametrize('order', ['parallel', 'chunkwise'])
def test_flow_model_fits_one_batch_through_the_frozen_decoder(order):
  """Either order; chunkwise with a time per chunk and self-conditioning."""
  vae_model, tokens, mask, _ = helpers.fit_tiny_vae(steps=150)
  vae_before = jax.tree.map(jnp.copy, nnx.state(vae_model, nnx.Param))

  chunkwise = order == 'chunkwise'
  model = dit.LatentFlowTransformer(
      helpers.tiny_dit_config(causal=chunkwise, self_condition=chunkwise),
      rngs=nnx.Rngs(1))
  cfg = flow.FlowConfig(noise_std=0.05, order=order, self_condition=chunkwise)
  rng = jax.random.key(2)  # one fixed batch: the same noise and t every step
  loss = lambda m: flow.diffusion_loss_fn(m, vae_model, tokens, mask, rng, cfg)
  metrics = nnx.jit(lambda m: loss(m)[1])
  first = metrics(model)
  model, losses = helpers.fit(model, loss, steps=150, lr=3e-3)
  last = metrics(model)
  assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
  # The cross-entropy term, which only reaches the flow model through the decoder,
  # falls on its own: gradients flow end to end.
  assert float(last['ce']) < float(first['ce']) / 10
  chex.assert_trees_all_equal(nnx.state(vae_model, nnx.Param), vae_before)


def test_a_chunkwise_model_reads_only_the_clean_chunks_before_each_chunk():
  """Chunk n's prediction moves with clean chunks < n, its own noisy latent and its
  own time, and never with anything of chunks > n or with clean chunk n itself."""
  model = dit.LatentFlowTransformer(helpers.tiny_dit_config(causal=True),
                                    rngs=nnx.Rngs(0))
  randomize_params(model)
  keys = jax.random.split(jax.random.key(0), 3)
  x_t, clean = (jax.random.normal(k, (1, 6, 16)) for k in keys[:2])
  t = jax.random.uniform(keys[2], (1, 6))
  n = 3
  out_n = lambda x_t, t, clean: model(x_t, t, None, clean)[0, n]
  jac = jax.jit(jax.jacobian(out_n, argnums=(0, 1, 2)))(x_t, t, clean)
  moved = [np.abs(np.asarray(j)).reshape(16, 6, -1).max(axis=(0, 2)) for j in jac]
  d_noisy, d_time, d_clean = moved
  assert np.all(d_noisy[:n + 1] > 0) and np.all(d_noisy[n + 1:] == 0), d_noisy
  assert np.all(d_time[:n + 1] > 0) and np.all(d_time[n + 1:] == 0), d_time
  assert np.all(d_clean[:n] > 0) and np.all(d_clean[n:] == 0), d_clean
  # A parallel model has no clean stream; a chunkwise one refuses to run without it.
  with np.testing.assert_raises(ValueError):
    model(x_t, t)
