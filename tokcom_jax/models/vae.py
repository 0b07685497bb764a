"""ChunkVAE: every K tokens become one continuous latent, and back.

Encoder: the K tokens of a chunk pass through a transformer on their own; the chunk's
last position is projected to the posterior mean and log-variance.
Decoder (parallel, v5.2): the latent, projected to the model width, is followed by K
learned "omni" placeholder embeddings; a transformer reads the K+1 positions and the
K omni positions give the K tokens' logits in parallel.
Decoder (`autoregressive_decoder`): the latent is followed by the chunk's first K-1
tokens; a causal transformer gives token k from the latent and tokens < k, so the K
tokens of a chunk are chosen jointly (K short passes at decode time) instead of each
on its own, which mixes the tokens of different chunks when a latent is ambiguous.

B batch, L tokens, K chunk size, N = L/K chunks, D model width, Z latent size, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tokcom_jax.models import axes, dit, generator, layers
from tokcom_jax.models.token_metrics import reconstruction_metrics

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class VAEConfig(layers.StackFields):
  vocab_size: int
  chunk_size: int
  latent_dim: int
  encoder_layers: int
  decoder_layers: int
  encoder_causal: bool = True
  decoder_causal: bool = True
  # Loss. kl_weight = 0 makes the encoder deterministic (z = mean), as in v5.2.
  kl_weight: float = 0.0
  kl_clamp: float = 0.0  # free bits: per-dimension KL floor
  latent_noise: float = 0.0  # std of Gaussian noise added to z in training
  latent_dropout: float = 0.0  # probability of zeroing a latent dimension in training
  token_dropout: float = 0.0  # probability of replacing an encoder input token by id 0
  normalize_latent: bool = False  # latent means scaled to RMS 1 per latent vector
  autoregressive_decoder: bool = False  # token k of a chunk also reads tokens < k
  # A latent prior: a flow model (the stage-2 architecture) trained with the VAE on
  # its latents, its loss × prior_weight flowing into the encoder too, so that
  # latents become predictable from their context as well as decodable.
  prior_weight: float = 0.0
  # Set when prior_weight > 0: the run's stage-2 architecture (a chunk generator for
  # flow.order='head', else the latent flow transformer).
  prior: dit.DiTConfig | generator.GeneratorConfig | None = None

  def stack(self, num_layers: int, causal: bool) -> layers.TransformerConfig:
    return layers.stack_config(self, num_layers, causal)

  @property
  def encoder(self) -> layers.TransformerConfig:
    return self.stack(self.encoder_layers, self.encoder_causal)

  @property
  def decoder(self) -> layers.TransformerConfig:
    return self.stack(self.decoder_layers, self.decoder_causal)

  @classmethod
  def from_config(cls, config) -> 'VAEConfig':
    """Reads `config.vae` and the shared fields of a tokcom_jax ConfigDict."""
    kwargs = layers.section_fields(cls, config.vae)
    if kwargs.get('prior_weight', 0.0) > 0 and config.flow.order == 'head':
      # The chunk generator, reading the previous chunk's tokens whatever stage 2
      # reads: an input that does not move with the latents it shapes (a prior that
      # read latents made them worse for a latent-input stage 2: RESULTS.md).
      prior = generator.GeneratorConfig.from_config(config)
      kwargs['prior'] = dataclasses.replace(
          prior, standardize=False, head=dataclasses.replace(prior.head, input='tokens'))
    elif kwargs.get('prior_weight', 0.0) > 0:  # in the VAE's own units: unstandardized
      kwargs['prior'] = dataclasses.replace(dit.DiTConfig.from_config(config),
                                            standardize=False)
    return cls(vocab_size=config.vocab_size, chunk_size=config.chunk_size,
               **layers.stack_options(config), **kwargs)


class ChunkVAE(nnx.Module):

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, Z, V, K = cfg.hidden_size, cfg.latent_dim, cfg.vocab_size, cfg.chunk_size
    self.embed = nnx.Embed(
        V, D, dtype=cfg.dtype,
        embedding_init=axes.partitioned(layers.default_init, 'vocab', 'embed'),
        rngs=rngs)
    self.encoder = layers.Transformer(cfg.encoder, rngs=rngs)
    self.to_mean = layers.dense(D, Z, ('embed', 'latent'), dtype=cfg.dtype,
                                use_bias=True, rngs=rngs)
    self.to_logvar = layers.dense(D, Z, ('embed', 'latent'), dtype=cfg.dtype,
                                  use_bias=True, rngs=rngs)
    self.from_latent = layers.dense(Z, D, ('latent', 'embed'), dtype=cfg.dtype,
                                    use_bias=True, rngs=rngs)
    if not cfg.autoregressive_decoder:
      self.omni_KD = nnx.Param(
          axes.partitioned(layers.default_init, None, 'embed')(
              rngs.params(), (K, D), jnp.float32))
    self.decoder = layers.Transformer(cfg.decoder, rngs=rngs)
    self.lm_head = layers.dense(D, V, ('embed', 'vocab'), dtype=cfg.dtype, rngs=rngs)
    if isinstance(cfg.prior, generator.GeneratorConfig):
      self.prior = generator.ChunkGenerator(cfg.prior, rngs=rngs)
    elif cfg.prior is not None:
      self.prior = dit.LatentFlowTransformer(cfg.prior, rngs=rngs)

  def encode(self, tokens_BL: Array) -> tuple[Array, Array]:
    """Token ids [B, L] → posterior (mean, logvar), each [B, N, Z] in fp32."""
    B, L = tokens_BL.shape
    K = self.cfg.chunk_size
    if L % K:
      raise ValueError(f'sequence length {L} is not a multiple of chunk_size {K}.')
    N = L // K
    x_MKD = self.embed(tokens_BL.reshape(B * N, K))  # M = B·N chunks
    last_MD = self.encoder(x_MKD)[:, -1]
    mean_BNZ = self.to_mean(last_MD).astype(jnp.float32).reshape(B, N, -1)
    if self.cfg.normalize_latent:
      # Every latent at RMS 1: the encoder cannot outgrow latent noise by inflating
      # its scale, so `latent_noise` is a share of the latents' own size.
      mean_BNZ = mean_BNZ * jax.lax.rsqrt(
          jnp.mean(jnp.square(mean_BNZ), axis=-1, keepdims=True) + 1e-6)
    logvar_BNZ = self.to_logvar(last_MD).astype(jnp.float32).reshape(B, N, -1)
    return mean_BNZ, logvar_BNZ

  def decode(self, z_BNZ: Array, tokens_BL: Array | None = None) -> Array:
    """Latents [B, N, Z] → logits [B, N·K, V] in fp32.

    The parallel decoder gives all K tokens of a chunk at once and ignores
    `tokens_BL`. The autoregressive decoder gives token k from the latent and the
    chunk's tokens < k: those of `tokens_BL` when given (teacher forcing, for losses),
    else its own argmax choices (free-running, what sampling and accuracy see).
    """
    if not self.cfg.autoregressive_decoder:
      return self._decode_parallel(z_BNZ)
    if tokens_BL is None:
      return self.decode_tokens(z_BNZ, lambda logits, k: jnp.argmax(logits, -1))[1]
    return self._decode_given(z_BNZ, tokens_BL)

  def decode_tokens(self, z_BNZ: Array, choose) -> tuple[Array, Array]:
    """Free-running decoding: token ids [B, N·K] and the logits [B, N·K, V] each was
    chosen from; `choose(logits_BNV, k)` picks position k of every chunk."""
    B, N, _ = z_BNZ.shape
    K = self.cfg.chunk_size
    if not self.cfg.autoregressive_decoder:
      logits_BNKV = self._decode_parallel(z_BNZ).reshape(B, N, K, -1)
      ids_BNK = jnp.stack([choose(logits_BNKV[:, :, k], k) for k in range(K)], -1)
      return ids_BNK.reshape(B, N * K), logits_BNKV.reshape(B, N * K, -1)
    ids_BNK = jnp.zeros((B, N, K), jnp.int32)
    steps = []
    for k in range(K):  # K passes; causal attention hides the unfilled positions
      logits_BNV = self._decode_given(z_BNZ, ids_BNK.reshape(B, N * K)).reshape(
          B, N, K, -1)[:, :, k]
      ids_BNK = ids_BNK.at[:, :, k].set(choose(logits_BNV, k).astype(jnp.int32))
      steps.append(logits_BNV)
    return ids_BNK.reshape(B, N * K), jnp.stack(steps, 2).reshape(B, N * K, -1)

  def _decode_parallel(self, z_BNZ: Array) -> Array:
    B, N, _ = z_BNZ.shape
    K, D = self.cfg.chunk_size, self.cfg.hidden_size
    latent_M1D = self.from_latent(z_BNZ.reshape(B * N, 1, -1))
    omni_MKD = jnp.broadcast_to(self.omni_KD[...].astype(latent_M1D.dtype),
                                (B * N, K, D))
    h_MTD = self.decoder(jnp.concatenate([latent_M1D, omni_MKD], axis=1))
    logits_MKV = self.lm_head(h_MTD[:, 1:])
    return logits_MKV.astype(jnp.float32).reshape(B, N * K, -1)

  def _decode_given(self, z_BNZ: Array, tokens_BL: Array) -> Array:
    """Autoregressive decoder, teacher-forced: position k reads the latent and the
    chunk's tokens < k and gives token k."""
    B, N, _ = z_BNZ.shape
    K = self.cfg.chunk_size
    latent_M1D = self.from_latent(z_BNZ.reshape(B * N, 1, -1))
    previous_MKD = self.embed(tokens_BL.reshape(B * N, K)[:, :-1]).astype(
        latent_M1D.dtype)
    h_MKD = self.decoder(jnp.concatenate([latent_M1D, previous_MKD], axis=1))
    return self.lm_head(h_MKD).astype(jnp.float32).reshape(B, N * K, -1)


def kl_to_standard_normal(mean_BNZ: Array, logvar_BNZ: Array, kl_clamp: float) -> Array:
  """Σ_z max(KL_z, kl_clamp), KL_z averaged over batch and chunks ("free bits")."""
  kl_BNZ = 0.5 * (jnp.square(mean_BNZ) + jnp.exp(logvar_BNZ) - 1.0 - logvar_BNZ)
  kl_Z = kl_BNZ.reshape(-1, kl_BNZ.shape[-1]).mean(axis=0)
  return jnp.maximum(kl_Z, kl_clamp).sum()


def perturb_latents(z_BNZ: Array, rng: Array, cfg: VAEConfig) -> Array:
  """Training-time robustness: Gaussian noise and per-dimension dropout on z."""
  noise_rng, drop_rng = jax.random.split(rng)
  if cfg.latent_noise > 0:
    z_BNZ = z_BNZ + cfg.latent_noise * jax.random.normal(noise_rng, z_BNZ.shape)
  if cfg.latent_dropout > 0:
    keep = jax.random.bernoulli(drop_rng, 1.0 - cfg.latent_dropout, z_BNZ.shape)
    z_BNZ = jnp.where(keep, z_BNZ / (1.0 - cfg.latent_dropout), 0.0)
  return z_BNZ


def loss_fn(model: ChunkVAE, tokens_BL: Array, mask_BL: Array, rng: Array | None,
            prior_loss: Callable[[Array], Array] | None = None
            ) -> tuple[Array, dict[str, Array]]:
  """Stage-1 loss: CE + kl_weight · KL (+ prior_weight · prior_loss(latent means),
  its gradient reaching the encoder; the stage passes `prior_loss` when the VAE has a
  prior). `rng=None` means evaluation (no sampling)."""
  cfg = model.cfg
  inputs_BL = tokens_BL
  if rng is not None and cfg.token_dropout > 0:
    # The encoder sees corrupted chunks, the decoder must still give the originals:
    # nearby latents then decode alike (CALM's input dropout).
    dropped = jax.random.bernoulli(jax.random.fold_in(rng, 2), cfg.token_dropout,
                                   tokens_BL.shape)
    inputs_BL = jnp.where(dropped, 0, tokens_BL)
  mean_BNZ, logvar_BNZ = model.encode(inputs_BL)
  z_BNZ = mean_BNZ
  if rng is not None:
    sample_rng, perturb_rng = jax.random.split(rng)
    if cfg.kl_weight > 0:
      eps_BNZ = jax.random.normal(sample_rng, mean_BNZ.shape)
      z_BNZ = mean_BNZ + jnp.exp(0.5 * logvar_BNZ) * eps_BNZ
    z_BNZ = perturb_latents(z_BNZ, perturb_rng, cfg)
  predicted_BL = None
  if rng is None and cfg.autoregressive_decoder:  # accuracy as decoding will see it
    predicted_BL = jnp.argmax(model.decode(z_BNZ), axis=-1)
  metrics = reconstruction_metrics(model.decode(z_BNZ, tokens_BL), tokens_BL, mask_BL,
                                   cfg.chunk_size, predicted_BL)
  metrics['kl'] = kl_to_standard_normal(mean_BNZ, logvar_BNZ, cfg.kl_clamp)
  metrics['loss'] = metrics['ce'] + cfg.kl_weight * metrics['kl']
  if prior_loss is not None:
    metrics['prior_mse'] = prior_loss(mean_BNZ)
    metrics['loss'] = metrics['loss'] + cfg.prior_weight * metrics['prior_mse']
  return metrics['loss'], metrics
