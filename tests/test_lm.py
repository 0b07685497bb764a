"""The causal LM baseline: causality, the KV-cache sampler against recomputation, CE."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from tokcom_jax.models import lm
from tokcom_jax.models.decoding import choose_tokens

B, S, V, D = 2, 12, 64, 32


def tiny_config(**kw) -> lm.LMConfig:
  base = dict(vocab_size=V, hidden_size=D, num_layers=2, num_heads=4,
              num_kv_heads=2, intermediate_size=64, rope_theta=10_000.0)
  base.update(kw)
  return lm.LMConfig(**base)


@functools.cache
def randomized(cfg: lm.LMConfig, seed: int = 0, std: float = 0.3):
  """(graphdef, params): every parameter drawn from N(base, std²), base 1 for norm
  scales and 0 otherwise.

  At Qwen2's 0.02 init the logits are nearly flat, the biases zero and the norms one:
  a wrong RoPE position or cache slot would barely move the tokens. These parameters
  make every piece count and keep argmax far from ties. Drawn with numpy on abstract
  shapes: op-by-op initialisation compiles every initializer, seconds on a CPU.
  """
  graphdef, abstract = nnx.split(
      nnx.eval_shape(lambda: lm.CausalLM(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    base = 1.0 if any(getattr(k, 'key', None) == 'scale' for k in path) else 0.0
    return jnp.asarray(base + std * rng.standard_normal(x.shape), jnp.float32)
  return graphdef, jax.tree.map_with_path(draw, abstract)


def random_buffer(seed: int = 0):
  return jax.random.randint(jax.random.key(seed), (B, S), 0, V, jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens_BS):
  return nnx.merge(graphdef, params)(tokens_BS)


def recompute(graphdef, params, buffer_BS, prompt_len, key, *, max_new_tokens=S,
              temperature=0.0, top_k=0, top_p=1.0):
  """The reference sampler: a full causal pass over the buffer per new token, no cache.

  The token at p is chosen from the logits at p-1 with the key folded with p, as the
  sampler promises; the forward pass is the only compiled piece (shared by all modes).
  """
  tokens_BS = np.array(buffer_BS)
  for p in range(prompt_len, min(S, prompt_len + max_new_tokens)):
    logits_BV = _forward(graphdef, params, jnp.asarray(tokens_BS))[:, p - 1]
    tokens_BS[:, p] = choose_tokens(logits_BV, jax.random.fold_in(key, p),
                                    temperature, top_k, top_p)
  return tokens_BS


GREEDY = dict(temperature=0.0)
TOP_K = dict(temperature=1.0, top_k=8)
TOP_P = dict(temperature=1.0, top_p=0.9)


@pytest.mark.parametrize('tie,sampling', [
    (False, GREEDY), (False, TOP_K), (False, TOP_P), (True, TOP_K),
], ids=['greedy', 'top_k', 'top_p', 'tied_top_k'])
def test_kv_cache_sampler_equals_recomputation(tie, sampling):
  graphdef, params = randomized(tiny_config(tie_embeddings=tie))
  buffer_BS, key = random_buffer(), jax.random.key(7)
  for prompt_len in (1, 4):
    got = lm.generate(graphdef, params, buffer_BS, prompt_len, key, **sampling)
    want = recompute(graphdef, params, buffer_BS, prompt_len, key, **sampling)
    np.testing.assert_array_equal(got, want)
    new = np.asarray(got[:, prompt_len:])
    assert len(np.unique(new)) > 3, new  # not a degenerate repeat of one token


def test_sampling_depends_on_the_key_and_differs_from_greedy():
  # Guards the equivalence test above against a sampler that ignores its options.
  graphdef, params = randomized(tiny_config())
  buffer_BS = random_buffer()
  greedy = lm.generate(graphdef, params, buffer_BS, 2, jax.random.key(0))
  sample = [lm.generate(graphdef, params, buffer_BS, 2, jax.random.key(s), **TOP_K)
            for s in (0, 1)]
  assert not np.array_equal(sample[0], greedy)
  assert not np.array_equal(sample[0], sample[1])


def test_prompt_and_tail_come_back_exactly_and_new_tokens_are_counted():
  graphdef, params = randomized(tiny_config())
  buffer_BS, key = random_buffer(3), jax.random.key(1)
  sampling = TOP_K
  got = np.asarray(lm.generate(graphdef, params, buffer_BS, 5, key,
                               max_new_tokens=3, **sampling))
  np.testing.assert_array_equal(got[:, :5], buffer_BS[:, :5])
  np.testing.assert_array_equal(got[:, 8:], buffer_BS[:, 8:])
  assert not np.array_equal(got[:, 5:8], buffer_BS[:, 5:8])
  # A shorter run is a prefix of a longer one: positions do not depend on the count.
  full = lm.generate(graphdef, params, buffer_BS, 5, key, **sampling)
  np.testing.assert_array_equal(got[:, :8], full[:, :8])
  want = recompute(graphdef, params, buffer_BS, 5, key, max_new_tokens=3, **sampling)
  np.testing.assert_array_equal(got, want)
  # Nothing to generate: the buffer comes back untouched.
  np.testing.assert_array_equal(
      lm.generate(graphdef, params, buffer_BS, S, key), buffer_BS)
  np.testing.assert_array_equal(
      lm.generate(graphdef, params, buffer_BS, 3, key, max_new_tokens=0), buffer_BS)


def test_sampler_compiles_once_for_all_prompt_lengths_and_counts():
  # A config no other test uses, so that the jit cache starts empty for it.
  graphdef, params = randomized(tiny_config(num_layers=1))
  buffer_BS, key = random_buffer(), jax.random.key(0)
  before = lm._generate._cache_size()
  for prompt_len, new in [(1, None), (3, 2), (7, 5), (11, 1), (4, 0)]:
    lm.generate(graphdef, params, buffer_BS, prompt_len, key, max_new_tokens=new,
                **TOP_K)
  assert lm._generate._cache_size() - before == 1


def test_model_is_causal_by_gradient():
  graphdef, params = randomized(tiny_config())
  t = 5

  @jax.jit
  def grad_of_position_t(params, tokens_BS):
    model = nnx.merge(graphdef, params)
    return jax.grad(lambda x: jnp.sum(
        model.logits(model.transformer(x))[:, t] ** 2))(model.embed(tokens_BS))

  grad_BTD = grad_of_position_t(params, random_buffer())
  later_T = jnp.abs(grad_BTD[:, t + 1:]).max(axis=(0, 2))
  earlier_T = jnp.abs(grad_BTD[:, :t + 1]).max(axis=(0, 2))
  assert bool(jnp.all(later_T == 0.0)), later_T  # exactly zero, not just small
  assert bool(jnp.all(earlier_T > 0.0)), earlier_T


def test_cached_decode_equals_the_full_pass():
  # Prefill a prefix, then one token at a time: the logits of one causal pass.
  graphdef, params = randomized(tiny_config())
  decode = jax.jit(lambda p, *a: nnx.merge(graphdef, p).decode(*a))
  model = nnx.merge(graphdef, params)
  tokens_BS = random_buffer()
  full_BSV = _forward(graphdef, params, tokens_BS)
  h_BTD, caches = decode(params, tokens_BS[:, :4], model.init_cache(B, S), jnp.int32(0))
  steps = [h_BTD]
  for p in range(4, S):
    h_B1D, caches = decode(params, tokens_BS[:, p:p + 1], caches, jnp.int32(p))
    steps.append(h_B1D)
  np.testing.assert_allclose(model.logits(jnp.concatenate(steps, axis=1)), full_BSV,
                             rtol=1e-4, atol=1e-4)


def count(module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_tied_embeddings_drop_exactly_the_lm_head():
  def build(tie):  # abstract: shapes and axis names without initialising anything
    return nnx.eval_shape(lambda: lm.CausalLM(tiny_config(tie_embeddings=tie),
                                              rngs=nnx.Rngs(0)))
  untied, tied = build(False), build(True)
  assert count(untied) - count(tied) == V * D
  specs = nnx.get_partition_spec(nnx.state(untied, nnx.Param))
  assert tuple(specs['embed']['embedding'].get_value()) == ('vocab', 'embed')
  assert tuple(specs['lm_head']['kernel'].get_value()) == ('embed', 'vocab')
  # Tied logits are the hidden states against the embedding matrix.
  tied = nnx.merge(*randomized(tiny_config(tie_embeddings=True)))
  h_BTD = jax.random.normal(jax.random.key(0), (B, 3, D))
  np.testing.assert_allclose(tied.logits(h_BTD), h_BTD @ tied.embed.embedding[...].T,
                             rtol=1e-5, atol=1e-5)


def test_token_ce_equals_a_hand_loop():
  graphdef, params = randomized(tiny_config())
  tokens_BS, garbage_BS = random_buffer(5), random_buffer(6)
  ce = jax.jit(lambda p, x: lm.token_ce(nnx.merge(graphdef, p), x))(params, tokens_BS)
  assert ce.shape == (B, S - 1)
  for t in range(1, S):
    # Only the prefix is given: the tokens from t on are replaced by others.
    prefix_BS = jnp.where(jnp.arange(S) < t, tokens_BS, garbage_BS)
    logits_BV = _forward(graphdef, params, prefix_BS)[:, t - 1]
    want_B = optax.softmax_cross_entropy_with_integer_labels(logits_BV, tokens_BS[:, t])
    np.testing.assert_allclose(ce[:, t - 1], want_B, rtol=1e-4, atol=1e-4)


def test_from_config_reads_the_ar_section():
  config = ml_collections.ConfigDict(dict(
      vocab_size=100, compute_dtype='bfloat16',
      ar=dict(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
              intermediate_size=128, rope_theta=1e4, rms_eps=1e-5,
              tie_embeddings=True)))
  cfg = lm.LMConfig.from_config(config)
  assert cfg == lm.LMConfig(
      vocab_size=100, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
      intermediate_size=128, rope_theta=1e4, rms_eps=1e-5, tie_embeddings=True,
      dtype=jnp.bfloat16)
  assert cfg.transformer.causal
  assert dataclasses.replace(cfg, dtype=jnp.float32).transformer.dtype == jnp.float32
