import jax.numpy as jnp
import pytest
from flax import nnx

from configs import tiny
from tokcom_jax import stages
from tokcom_jax.models import flops


def one_layer(*switches, **extra):
  mods = {'tokenizer': 'bpe:384', 'vocab_size': 384, 'max_length': 8, 'vae.hidden_size': 32,
          'vae.encoder_layers': 1, 'vae.decoder_layers': 1, 'vae.num_heads': 2,
          'vae.num_kv_heads': 1, 'vae.intermediate_size': 64, 'vae.latent_dim': 8,
          'dit.hidden_size': 32, 'dit.num_layers': 1, 'dit.num_heads': 2,
          'dit.num_kv_heads': 1, 'dit.intermediate_size': 64, 'dit.time_freq_dim': 32,
          **extra}
  # The chunkwise recipe, unless a switch names the original (recipe=v52).
  pins = [] if 'recipe' in extra or 'recipe=v52' in switches else [
      'flow.order=chunkwise', 'flow.self_condition=True']
  return tiny.get_config(','.join(['vae', *pins, *switches]
                                  + [f'{k}={v}' for k, v in mods.items()]))


def test_one_layer_hand_count():
  config = one_layer()
  # Per token and layer: q 32·32, k and v 2·32·16, o 32·32, SwiGLU 3·32·64 → ×2.
  per_token = 2 * (1024 + 1024 + 1024 + 6144)
  assert per_token == 18432
  # Batch 2 × 8 tokens = 4 chunks. Encoder: 4 chunks × 4 tokens, causal attention
  # 4·4²·32 / 2 per chunk, mean and logvar heads 2·(2·32·8) per chunk.
  encoder = 16 * per_token + 4 * 1024 + 4 * 1024
  # Decoder: 4 × (latent + 4 placeholders), causal attention 4·5²·32 / 2 per chunk,
  # from_latent 2·8·32 per chunk, the unembedding 2·32·384 per token.
  decoder = 20 * per_token + 4 * 1600 + 4 * 512 + 16 * 2 * 32 * 384
  assert flops.vae_forward(config, 2) == {'encoder': encoder, 'decoder': decoder}
  no_prior = one_layer(prior_weight=0.0)
  assert stages.get(no_prior, 'vae').train_flops(2) == 3 * (encoder + decoder) == 3220224
  # Flow transformer: 2 × 2 latents, full attention 4·2²·32 per sequence, in/out
  # projections, and per sample the timestep MLP and two adaLN modulations.
  condition = 2 * (32 * 32 + 32 * 32) + 2 * 32 * 192 + 2 * 32 * 64
  dit = 4 * per_token + 2 * 512 + 4 * 2 * (8 * 32 + 32 * 8) + 2 * condition
  v52_flow = one_layer(recipe='v52')  # parallel, no self-conditioning
  assert flops.dit_forward(v52_flow, 2) == dit == 119808
  assert stages.get(v52_flow, 'diffusion').train_flops(2) == (
      3 * dit + encoder + 2 * decoder)
  # Chunkwise (a condition per chunk, the clean-context projection) with
  # self-conditioning (the estimate's projection, one more pass).
  chunkwise = dit + 2 * condition + 2 * 4 * (2 * 8 * 32)
  assert flops.dit_forward(config, 2) == chunkwise
  assert stages.get(config, 'diffusion').train_flops(2) == (
      4 * chunkwise + encoder + 2 * decoder)
  # Its stage 1 trains the latent prior too: the flow model's forward and backward
  # and the self-conditioning estimate, on the same latents.
  assert config.vae.prior_weight > 0
  assert stages.get(config, 'vae').train_flops(2) == (
      3 * (encoder + decoder) + 4 * chunkwise)


@pytest.mark.parametrize('stage', ['vae', 'diffusion', 'diffusion,recipe=v52'])
def test_count_agrees_with_xla(stage):
  """XLA's own count of the forward pass (bidirectional attention, which XLA
  computes whole) is the model count plus a little elementwise work."""
  stage, *recipe = stage.split(',')
  config = one_layer(*recipe, **{'vae.hidden_size': 256, 'vae.intermediate_size': 768,
                        'vae.num_heads': 4, 'vae.encoder_causal': False,
                        'vae.decoder_causal': False, 'dit.hidden_size': 256,
                        'dit.intermediate_size': 768, 'dit.num_heads': 4,
                        'max_length': 64})
  vae_model = stages.get(config, 'vae').build(nnx.Rngs(0))
  if stage == 'vae':
    fn = lambda m, tokens: m.decode(m.encode(tokens)[0])
    args = (vae_model, jnp.zeros((2, 64), jnp.int32))
    ours = sum(flops.vae_forward(config, 2).values())
  else:
    chunkwise = config.flow.order == 'chunkwise'
    fn = lambda m, x, t: m(x, t, jnp.ones_like(x), x if chunkwise else None)
    args = (stages.get(config, 'diffusion').build(nnx.Rngs(0)), jnp.zeros((2, 16, 8)),
            jnp.zeros((2, 16) if chunkwise else (2,)))
    ours = flops.dit_forward(config, 2)
  xla = nnx.jit(fn).lower(*args).compile().cost_analysis()['flops']
  assert ours <= xla < 1.15 * ours, (ours, xla)


def test_peaks():
  assert flops.peak_flops_per_device('NVIDIA H100 80GB HBM3') == 989e12
  assert flops.peak_flops_per_device('TPU v5 lite') == 197e12
  assert flops.peak_flops_per_device('TPU v5p') == 459e12
  assert flops.peak_flops_per_device('cpu') is None


def test_the_chunk_generator_count_agrees_with_xla():
  """The trunk once over the chunks, the head on batch_mul rows per chunk, the
  token head: XLA's count of the same forward pass."""
  from tokcom_jax.models import generator
  config = one_layer(**{'flow.order': 'head', 'flow.self_condition': False,
                        'dit.hidden_size': 256, 'dit.intermediate_size': 768,
                        'dit.num_heads': 4, 'head.token_loss': 0.5, 'max_length': 64})
  model = stages.get(config, 'diffusion').build(nnx.Rngs(0))
  assert isinstance(model, generator.ChunkGenerator)
  B, N, Z, m = 2, 16, 8, config.head.batch_mul

  def fn(model, tokens, x1):
    h = model.states(tokens, x1)
    rows = lambda a: jnp.repeat(a.reshape(B * N, a.shape[-1]), m, axis=0)
    return (model.head(rows(x1), jnp.zeros((B * N * m,)), rows(h)),
            model.next_token_logits(h))
  ours = flops.generator_forward(config, 2)
  xla = nnx.jit(fn).lower(model, jnp.zeros((2, 64), jnp.int32),
                          jnp.zeros((B, N, Z))).compile().cost_analysis()['flops']
  # The trunk's causal attention is counted at half; XLA computes it whole.
  assert ours <= xla < 1.15 * ours, (ours, xla)

