import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tokcom_jax.models import dit, layers, ops


def small_cfg(**kw):
  base = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
              intermediate_size=64)
  base.update(kw)
  return layers.TransformerConfig(**base)


def count(module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_shapes():
  """Each layer built and applied abstractly (`nnx.eval_shape`: traced, not run)."""
  cfg = small_cfg()
  x = jax.ShapeDtypeStruct((3, 7, 32), jnp.float32)
  cond = jax.ShapeDtypeStruct((3, 32), jnp.float32)
  pos = jnp.arange(7)
  shape = lambda f, *args: nnx.eval_shape(lambda *a: f(nnx.Rngs(0))(*a), *args).shape
  assert nnx.eval_shape(lambda x: layers.apply_rope(x, pos, 1e4), jax.ShapeDtypeStruct(
      (3, 7, 4, 8), jnp.float32)).shape == (3, 7, 4, 8)
  assert shape(lambda r: layers.Attention(cfg, rngs=r), x, pos) == (3, 7, 32)
  assert shape(lambda r: layers.SwiGLU(cfg, rngs=r), x) == (3, 7, 32)
  assert shape(lambda r: layers.Block(cfg, rngs=r), x, pos) == (3, 7, 32)
  assert shape(lambda r: layers.Transformer(cfg, rngs=r), x) == (3, 7, 32)
  assert shape(lambda r: dit.AdaLNZeroBlock(cfg, rngs=r), x, cond, pos) == (3, 7, 32)
  assert shape(lambda r: dit.AdaLNFinalLayer(cfg, 5, rngs=r), x, cond) == (3, 7, 5)
  assert shape(lambda r: dit.TimestepEmbedding(32, rngs=r), jnp.ones(3)) == (3, 32)
  chex.assert_shape(dit.sinusoidal_embedding(jnp.ones(3), 16), (3, 16))


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


def test_rope_rotates_halves_like_qwen2():
  # Head size 4, theta 4: inv_freq = theta^(-2i/4) = [1, 1/2], so position p turns
  # the pair (x0, x2) by p radians and the pair (x1, x3) by p/2 radians.
  H, theta = 4, 4.0
  positions_T = np.array([0, 1, 2])
  x_BTNH = np.arange(1.0, 13.0).reshape(1, 3, 1, H) * np.array([1.0, -0.5, 0.25, 2.0])
  inv_freq_F = theta ** (-2.0 * np.arange(H // 2) / H)
  np.testing.assert_allclose(inv_freq_F, [1.0, 0.5])
  angle_TF = positions_T[:, None] * inv_freq_F[None, :]
  cos_TF, sin_TF = np.cos(angle_TF)[:, None, :], np.sin(angle_TF)[:, None, :]
  x1, x2 = x_BTNH[..., :H // 2], x_BTNH[..., H // 2:]
  expected_BTNH = np.concatenate([x1 * cos_TF - x2 * sin_TF,
                                  x2 * cos_TF + x1 * sin_TF], axis=-1)
  got_BTNH = layers.apply_rope(jnp.asarray(x_BTNH, jnp.float32), jnp.asarray(positions_T),
                               theta)
  np.testing.assert_allclose(got_BTNH, expected_BTNH, rtol=1e-5, atol=1e-5)
  # Written out: e0 at position 1 and e1 at position 2 both turn by one radian, into
  # the second half (GPT-J's interleaved pairs would give [cos 1, sin 1, 0, 0]).
  c, s = np.cos(1.0), np.sin(1.0)
  basis_BTNH = jnp.array([[[[1.0, 0, 0, 0]], [[0, 1.0, 0, 0]]]])
  np.testing.assert_allclose(
      layers.apply_rope(basis_BTNH, jnp.array([1, 2]), theta)[0, :, 0],
      [[c, 0, s, 0], [0, c, 0, s]], atol=1e-6)


@pytest.mark.parametrize('eps', [1e-6, 1e-5])
def test_rms_norm_scales_by_its_weight_with_eps_inside_the_sqrt(eps):
  # RMS ~1e-3, so mean(x²) ~1e-6 is the size of eps: the two eps values give outputs
  # that differ by a factor ~2, far above the tolerance; a non-constant, non-unit
  # scale catches a dropped or misapplied weight.
  norm = layers.rms_norm(32, small_cfg(rms_eps=eps), rngs=nnx.Rngs(0))
  scale_D = np.linspace(0.5, 2.0, 32)
  norm.scale[...] = jnp.asarray(scale_D, jnp.float32)
  x_BTD = np.asarray(jax.random.normal(jax.random.key(0), (2, 3, 32)), np.float64) * 1e-3

  def expected(e):
    return x_BTD / np.sqrt(np.mean(x_BTD ** 2, axis=-1, keepdims=True) + e) * scale_D

  got_BTD = norm(jnp.asarray(x_BTD, jnp.float32))
  np.testing.assert_allclose(got_BTD, expected(eps), rtol=1e-5, atol=1e-6)
  other_eps = 1e-5 if eps == 1e-6 else 1e-6
  assert np.abs(expected(other_eps) - expected(eps)).max() > 0.1  # eps matters here


def test_sinusoidal_embedding_is_cos_then_sin_of_t_times_frequencies():
  # dim 8, half 4: f_i = exp(-ln(10000)·i/4) = 10000^(-i/4) = [1, 0.1, 0.01, 0.001].
  t_B = np.array([0.0, 1.0, 2.5])
  f_F = np.array([1.0, 0.1, 0.01, 0.001])
  np.testing.assert_allclose(f_F, np.exp(-np.log(10_000.0) * np.arange(4) / 4))
  expected_BE = np.concatenate([np.cos(t_B[:, None] * f_F), np.sin(t_B[:, None] * f_F)],
                               axis=-1)
  got_BE = dit.sinusoidal_embedding(jnp.asarray(t_B, jnp.float32), 8)
  np.testing.assert_allclose(got_BE, expected_BE, rtol=1e-6, atol=1e-6)
  # The order: cos first. t = 0 gives cos = 1 then sin = 0.
  np.testing.assert_array_equal(got_BE[0], [1, 1, 1, 1, 0, 0, 0, 0])
  # max_period sets the frequency range: 100^(-i/2) = [1, 0.1] for dim 4.
  np.testing.assert_allclose(
      dit.sinusoidal_embedding(jnp.array([2.5]), 4, max_period=100.0)[0],
      [np.cos(2.5), np.cos(0.25), np.sin(2.5), np.sin(0.25)], rtol=1e-6, atol=1e-6)


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
  block = dit.AdaLNZeroBlock(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  cond = jax.random.normal(jax.random.key(1), (2, 32))
  np.testing.assert_array_equal(block(x, cond, jnp.arange(5)), x)
  # ... and not once its modulation is non-zero: the test above could not pass by accident.
  block.modulation.bias[...] = jnp.ones_like(block.modulation.bias[...])
  assert float(jnp.abs(block(x, cond, jnp.arange(5)) - x).max()) > 1e-3


def test_final_layer_outputs_zeros_at_init():
  final = dit.AdaLNFinalLayer(small_cfg(), 7, rngs=nnx.Rngs(0))
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


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_swiglu_written_out_backward_equals_autodiff(dtype):
  """ops.swiglu's hand-written VJP against jax.grad of the plain expression."""
  ks = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(ks[0], (2, 5, 16)).astype(dtype)
  gate = (0.3 * jax.random.normal(ks[1], (16, 24))).astype(dtype)
  up = (0.3 * jax.random.normal(ks[2], (16, 24))).astype(dtype)
  down = (0.3 * jax.random.normal(ks[3], (24, 16))).astype(dtype)
  cot = jax.random.normal(ks[4], (2, 5, 16)).astype(dtype)
  plain = lambda x, g, u, d: (jax.nn.silu(x @ g) * (x @ u)) @ d
  loss = lambda f: lambda *a: jnp.sum((f(*a) * cot).astype(jnp.float32))
  args = (x, gate, up, down)
  # bfloat16: rounding in another order; 2% of the largest entry, where a wrong
  # derivative is off by the size of the entries themselves.
  share = 1e-5 if dtype == jnp.float32 else 2e-2

  def close(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max() <= share * np.abs(b).max(), np.abs(a - b).max()
  close(ops.swiglu(*args), plain(*args))
  mine = jax.grad(loss(ops.swiglu), argnums=(0, 1, 2, 3))(*args)
  ref = jax.grad(loss(plain), argnums=(0, 1, 2, 3))(*args)
  for a, b in zip(mine, ref):
    assert a.dtype == b.dtype == dtype
    close(a, b)
