import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import v52
from tests import helpers
from tokcom_jax.models import token_metrics, vae


def qwen2_stack_params(layers, D, heads, kv_heads, F):
  """Qwen2 per-layer arithmetic: q/k/v with bias, o without, SwiGLU, two RMSNorms;
  plus the stack's final RMSNorm. H = D / heads."""
  H = D // heads
  attention = (D * heads * H + heads * H) + 2 * (D * kv_heads * H + kv_heads * H) \
      + heads * H * D
  return layers * (attention + 3 * D * F + 2 * D) + D


def param_count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


# Jitted once for the module: every test model of one config shares the compiled code.
encode = nnx.jit(lambda model, tokens: model.encode(tokens))
decode = nnx.jit(lambda model, z: model.decode(z))


def test_encode_decode_shapes():
  cfg = helpers.tiny_vae_config()
  model = vae.ChunkVAE(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (3, 32), 0, 256)

  @nnx.jit
  def all_outputs(model):
    mean, logvar = model.encode(tokens)
    return mean, logvar, model.decode(mean), vae.loss_fn(
        model, tokens, jnp.ones_like(tokens), jax.random.key(1))

  mean, logvar, logits, (loss, metrics) = all_outputs(model)
  chex.assert_shape([mean, logvar], (3, 8, 16))
  chex.assert_type([mean, logvar], jnp.float32)
  chex.assert_shape(logits, (3, 32, 256))
  chex.assert_shape([loss] + list(metrics.values()), ())


def test_chunks_are_encoded_independently():
  # Changing a token of chunk 1 moves only latent 1, and decoding is per-latent too.
  model = vae.ChunkVAE(helpers.tiny_vae_config(), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (1, 16), 0, 256)
  other = tokens.at[0, 5].set((tokens[0, 5] + 1) % 256)
  delta = jnp.abs(encode(model, tokens)[0] - encode(model, other)[0]).max(axis=-1)[0]
  assert float(delta[1]) > 0 and float(delta[jnp.array([0, 2, 3])].max()) == 0.0
  z = encode(model, tokens)[0]
  moved = jnp.abs(decode(model, z) - decode(model, z.at[0, 2].add(1.0))).max(axis=-1)[0]
  assert float(moved[8:12].min()) > 0 and float(moved[:8].max()) == 0.0


def test_v52_stack_parameter_counts_match_qwen2_arithmetic():
  config = v52.get_config('vae')
  cfg = vae.VAEConfig.from_config(config)
  abstract = nnx.eval_shape(lambda: vae.ChunkVAE(cfg, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  D, heads, kv, F = 896, 14, 2, 4864
  assert param_count(params['encoder']) == qwen2_stack_params(12, D, heads, kv, F)
  assert param_count(params['decoder']) == qwen2_stack_params(12, D, heads, kv, F)
  # 14,912,384 per layer; the published Qwen2-0.5B total (24 layers + tied 151936-row
  # embedding) is 494,032,768 parameters.
  assert qwen2_stack_params(1, D, heads, kv, F) - D == 14_912_384
  assert qwen2_stack_params(24, D, heads, kv, F) + 151_936 * D == 494_032_768
  V, Z = 32016, 896
  heads_and_embeddings = V * D + 2 * (D * Z + Z) + (Z * D + D) + 4 * D + D * V
  assert param_count(params) == 2 * qwen2_stack_params(12, D, heads, kv, F) \
      + heads_and_embeddings


def test_metrics_on_known_logits():
  # 2 chunks of 2 tokens: chunk 0 all right; chunk 1 one wrong; one padded token.
  tokens = jnp.array([[1, 2, 3, 0]])
  predicted = jnp.array([[1, 2, 1, 0]])
  logits = jax.nn.one_hot(predicted, 4) * 10.0
  mask = jnp.array([[1, 1, 1, 0]])
  m = token_metrics.reconstruction_metrics(logits, tokens, mask, chunk_size=2)
  np.testing.assert_allclose(m['token_accuracy'], 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(m['chunk_exact_match'], 1 / 2, rtol=1e-6)
  ce_right = -jax.nn.log_softmax(jnp.array([10.0, 0, 0, 0]))[0]
  ce_wrong = -jax.nn.log_softmax(jnp.array([0, 10.0, 0, 0]))[3]
  np.testing.assert_allclose(m['ce'], (2 * ce_right + ce_wrong) / 3, rtol=1e-5)


def test_kl_with_nonzero_logvar_and_per_dimension_free_bits():
  # KL_z = ½(μ² + e^lv − 1 − lv) per element, averaged over the 2 examples, then
  # floored per dimension. Written out for three latent dimensions:
  ln2 = np.log(2.0)
  mean_BNZ = jnp.array([[[1.0, 0.0, 0.0]], [[1.0, 0.5, 0.0]]])
  logvar_BNZ = jnp.array([[[ln2, -ln2, 0.1]], [[ln2, 0.0, -0.1]]], jnp.float32)
  kl_z0 = 0.5 * (1 + 2 - 1 - ln2)  # both examples
  kl_z1 = (0.5 * (0 + 0.5 - 1 + ln2) + 0.5 * 0.25) / 2  # 0.0966 and 0.125 → 0.1108
  kl_z2 = (0.5 * (np.exp(0.1) - 1 - 0.1) + 0.5 * (np.exp(-0.1) - 1 + 0.1)) / 2  # 0.0025

  def kl(clamp):
    return float(vae.kl_to_standard_normal(mean_BNZ, logvar_BNZ, clamp))

  np.testing.assert_allclose(kl(0.0), kl_z0 + kl_z1 + kl_z2, rtol=1e-5)
  # A floor of 0.1 binds for z2 only. It applies to the dimension's average: z1's
  # first element (0.0966) is below the floor but its average (0.1108) is not.
  np.testing.assert_allclose(kl(0.1), kl_z0 + kl_z1 + 0.1, rtol=1e-5)
  # Batch and chunks are averaged alike: the same six latents as one example of 2 chunks.
  np.testing.assert_allclose(
      vae.kl_to_standard_normal(mean_BNZ.reshape(1, 2, 3), logvar_BNZ.reshape(1, 2, 3),
                                0.1), kl(0.1), rtol=1e-6)


def dot_operand_dtypes(fn, *args) -> set[str]:
  """The operand dtypes of every matmul (dot_general) in fn's jaxpr, nested ones too."""
  dtypes = set()
  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        dtypes.update(str(v.aval.dtype) for v in eqn.invars)
    for sub in jax.extend.core.subjaxprs(jaxpr):
      walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return dtypes


# bf16 keeps 8 significant bits (~2.4 digits): eps = 2^-7 ≈ 0.8%, so each rounding
# errs by up to 0.4%. Errors are relative to the activations, not to each output
# element, so the bound is on the largest error against the largest fp32 output.
# Measured on the tiny models over 3 seeds: 0.4-0.7% (VAE), 0.8-0.9% (DiT). 4 eps ≈ 3%
# leaves room for other seeds and XLA versions, while a real bf16 bug lands outside
# (1000·t rounded to bf16 before the time embedding's sinusoids: ~10%).
BF16_TOLERANCE = 4 * float(jnp.finfo(jnp.bfloat16).eps)


def assert_close_to_fp32(got, reference):
  assert got.dtype == jnp.float32, got.dtype
  error = float(jnp.abs(got - reference).max())
  scale = float(jnp.abs(reference).max())
  assert 0 < error <= BF16_TOLERANCE * scale, (error, scale)  # 0 would mean no bf16


def test_bf16_compute_matches_fp32_with_the_same_parameters():
  fp32 = vae.ChunkVAE(helpers.tiny_vae_config(), rngs=nnx.Rngs(0))
  bf16 = vae.ChunkVAE(helpers.tiny_vae_config(dtype=jnp.bfloat16), rngs=nnx.Rngs(1))
  # Parameters stay fp32 whatever the compute dtype (checked before the copy, which
  # would replace them by fp32 arrays).
  assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {
      jnp.dtype(jnp.float32)}
  nnx.update(bf16, nnx.state(fp32, nnx.Param))
  params = nnx.state(bf16, nnx.Param)
  chex.assert_trees_all_equal(params, nnx.state(fp32, nnx.Param))
  tokens_BL = jax.random.randint(jax.random.key(0), (2, 8), 0, 256)
  z_BNZ = jax.random.normal(jax.random.key(1), (2, 2, 16))  # one input to both decoders

  @nnx.jit
  def encode_and_decode(model):
    return model.encode(tokens_BL) + (model.decode(z_BNZ),)

  for got, reference in zip(encode_and_decode(bf16), encode_and_decode(fp32)):
    assert_close_to_fp32(got, reference)  # mean, logvar, logits
  # Every matmul runs in bf16 (parameters are cast to the compute dtype).
  assert dot_operand_dtypes(bf16.encode, tokens_BL) == {'bfloat16'}
  assert dot_operand_dtypes(bf16.decode, z_BNZ) == {'bfloat16'}


def test_latent_perturbations_only_in_training():
  cfg = helpers.tiny_vae_config(latent_noise=0.5, latent_dropout=0.5)
  z = jnp.ones((2, 4, 16))
  perturbed = vae.perturb_latents(z, jax.random.key(0), cfg)
  dropped = float(jnp.mean(perturbed == 0.0))
  assert 0.3 < dropped < 0.7
  model = vae.ChunkVAE(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  mask = jnp.ones_like(tokens)
  eval_a = vae.loss_fn(model, tokens, mask, None)[0]
  eval_b = vae.loss_fn(model, tokens, mask, None)[0]
  train = vae.loss_fn(model, tokens, mask, jax.random.key(3))[0]
  assert float(eval_a) == float(eval_b) and float(train) != float(eval_a)


def test_vae_fits_one_batch():
  model, tokens, mask, losses = helpers.fit_tiny_vae(steps=200)
  assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
  metrics = vae.loss_fn(model, tokens, mask, None)[1]
  assert float(metrics['token_accuracy']) == 1.0


def test_normalized_latents_have_rms_one_whatever_the_encoder_scale():
  model = vae.ChunkVAE(helpers.tiny_vae_config(normalize_latent=True),
                       rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  mean, _ = model.encode(tokens)
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(jnp.square(mean), -1)), 1.0, rtol=1e-4)
  # Scaling the projection 100× changes nothing: the scale is not the encoder's.
  model.to_mean.kernel[...] = 100 * model.to_mean.kernel[...]
  model.to_mean.bias[...] = 100 * model.to_mean.bias[...]
  np.testing.assert_allclose(model.encode(tokens)[0], mean, rtol=1e-4, atol=1e-5)


def test_autoregressive_decoder_is_causal_within_the_chunk_and_free_runs_on_its_own():
  model = vae.ChunkVAE(helpers.tiny_vae_config(autoregressive_decoder=True),
                       rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  z = model.encode(tokens)[0]
  logits = model.decode(z, tokens)
  # Token k reads tokens < k of its own chunk only: changing token 5 (chunk 1,
  # position 1) moves the logits of positions 6 and 7, not 4, 5 or other chunks.
  moved = jnp.abs(model.decode(z, tokens.at[:, 5].add(1)) - logits).max(-1)[0]
  assert float(moved[6:8].min()) > 0
  assert float(jnp.concatenate([moved[:6], moved[8:]]).max()) == 0.0
  # Free-running: each token is the argmax given its own earlier choices, i.e.
  # teacher forcing on the chosen ids gives back the same logits and ids.
  ids, free_logits = model.decode_tokens(z, lambda l, k: jnp.argmax(l, -1))
  np.testing.assert_allclose(free_logits, model.decode(z, ids), atol=1e-5)
  np.testing.assert_array_equal(ids, jnp.argmax(model.decode(z), -1))
  assert not hasattr(model, 'omni_KD')


def test_autoregressive_decoder_fits_one_batch_free_running():
  model, tokens, mask, losses = helpers.fit_tiny_vae(steps=200,
                                                     autoregressive_decoder=True)
  assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
  # Evaluation scores the decoder's own choices, not teacher forcing.
  assert float(vae.loss_fn(model, tokens, mask, None)[1]['token_accuracy']) == 1.0
