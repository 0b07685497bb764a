import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tokcom_jax import layers


def small_cfg(**kw):
  base = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
              intermediate_size=64)
  base.update(kw)
  return layers.TransformerConfig(**base)


def count(module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_shapes():
  cfg = small_cfg()
  rngs = nnx.Rngs(0)
  x = jax.random.normal(jax.random.key(1), (3, 7, 32))
  pos = jnp.arange(7)
  chex.assert_shape(layers.apply_rope(x.reshape(3, 7, 4, 8), pos, 1e4), (3, 7, 4, 8))
  chex.assert_shape(layers.Attention(cfg, rngs=rngs)(x, pos), (3, 7, 32))
  chex.assert_shape(layers.SwiGLU(cfg, rngs=rngs)(x), (3, 7, 32))
  chex.assert_shape(layers.Block(cfg, rngs=rngs)(x, pos), (3, 7, 32))
  chex.assert_shape(layers.Transformer(cfg, rngs=rngs)(x), (3, 7, 32))
  cond = jax.random.normal(jax.random.key(2), (3, 32))
  chex.assert_shape(layers.AdaLNZeroBlock(cfg, rngs=rngs)(x, cond, pos), (3, 7, 32))
  chex.assert_shape(layers.AdaLNFinalLayer(cfg, 5, rngs=rngs)(x, cond), (3, 7, 5))
  chex.assert_shape(layers.sinusoidal_embedding(jnp.ones(3), 16), (3, 16))
  chex.assert_shape(layers.TimestepEmbedding(32, rngs=rngs)(jnp.ones(3)), (3, 32))


def test_rope_is_a_rotation_relative_in_position():
  # q·k after RoPE depends only on the distance between positions, and norms are kept.
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))
  def score(pq, pk):
    return jnp.sum(layers.apply_rope(q, jnp.array([pq]), 1e4)
                   * layers.apply_rope(k, jnp.array([pk]), 1e4))
  np.testing.assert_allclose(score(3, 1), score(12, 10), rtol=1e-5)
  assert abs(float(score(3, 1) - score(3, 2))) > 1e-3
  np.testing.assert_allclose(
      jnp.linalg.norm(layers.apply_rope(q, jnp.array([5]), 1e4)), jnp.linalg.norm(q),
      rtol=1e-6)


def test_rms_norm_matches_formula():
  cfg = small_cfg()
  norm = layers.rms_norm(32, cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 3, 32)) * 5
  expected = x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.rms_eps)
  np.testing.assert_allclose(norm(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('causal', [True, False])
def test_attention_causality_by_gradient(causal):
  cfg = small_cfg(causal=causal)
  attn = layers.Attention(cfg, rngs=nnx.Rngs(0))
  T, i = 6, 2
  x = jax.random.normal(jax.random.key(3), (1, T, 32))
  grad = jax.grad(lambda x: jnp.sum(attn(x, jnp.arange(T))[:, i] ** 2))(x)
  later = jnp.abs(grad[0, i + 1:]).max(axis=-1)
  earlier = jnp.abs(grad[0, :i + 1]).max(axis=-1)
  assert bool(jnp.all(earlier > 0))
  if causal:
    assert bool(jnp.all(later == 0.0)), later  # exactly zero, not just small
  else:
    assert bool(jnp.all(later > 1e-6)), later


def test_grouped_query_attention_equals_repeated_kv_heads():
  # GQA with 2 KV heads for 4 query heads == plain multi-head attention on repeated K/V.
  cfg = small_cfg()
  attn = layers.Attention(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  pos = jnp.arange(5)
  q = layers.apply_rope(attn.query(x), pos, cfg.rope_theta)
  k = jnp.repeat(layers.apply_rope(attn.key(x), pos, cfg.rope_theta), 2, axis=2)
  v = jnp.repeat(attn.value(x), 2, axis=2)
  w = jax.nn.softmax(jnp.einsum('btnh,bsnh->bnts', q, k) / jnp.sqrt(8.0), axis=-1)
  expected = attn.out(jnp.einsum('bnts,bsnh->btnh', w, v))
  np.testing.assert_allclose(attn(x, pos), expected, rtol=1e-5, atol=1e-5)


def test_adaln_zero_block_is_identity_at_init():
  cfg = small_cfg()
  block = layers.AdaLNZeroBlock(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  cond = jax.random.normal(jax.random.key(1), (2, 32))
  np.testing.assert_array_equal(block(x, cond, jnp.arange(5)), x)
  # ... and not once its modulation is non-zero: the test above could not pass by accident.
  block.modulation.bias[...] = jnp.ones_like(block.modulation.bias[...])
  assert float(jnp.abs(block(x, cond, jnp.arange(5)) - x).max()) > 1e-3


def test_final_layer_outputs_zeros_at_init():
  final = layers.AdaLNFinalLayer(small_cfg(), 7, rngs=nnx.Rngs(0))
  out = final(jax.random.normal(jax.random.key(0), (2, 5, 32)),
              jax.random.normal(jax.random.key(1), (2, 32)))
  np.testing.assert_array_equal(out, jnp.zeros((2, 5, 7)))


def test_qwen2_parameter_arithmetic_for_one_block():
  D, N, K, H, F = 32, 4, 2, 8, 64
  block = layers.Block(small_cfg(), rngs=nnx.Rngs(0))
  attention = D * N * H + N * H + 2 * (D * K * H + K * H) + N * H * D
  assert count(block) == attention + 3 * D * F + 2 * D


def test_parameters_carry_logical_axis_names():
  block = layers.Block(small_cfg(), rngs=nnx.Rngs(0))
  specs = nnx.get_partition_spec(nnx.state(block, nnx.Param))
  assert tuple(specs['attn']['query']['kernel'].get_value()) == ('embed', 'heads', 'head_dim')
  assert tuple(specs['attn']['key']['kernel'].get_value()) == ('embed', 'kv_heads', 'head_dim')
  assert tuple(specs['mlp']['down']['kernel'].get_value()) == ('mlp', 'embed')


def test_bad_shapes_are_rejected_with_a_clear_message():
  with pytest.raises(ValueError, match='not divisible by num_heads'):
    small_cfg(hidden_size=30)
  with pytest.raises(ValueError, match='not divisible by num_kv_heads'):
    small_cfg(num_kv_heads=3)
