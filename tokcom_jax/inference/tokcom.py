"""Load a trained run and use it: generate, reconstruct, encode, decode.

    import tokcom_jax
    model = tokcom_jax.load('runs/tiny/diffusion')
    print(model.generate(2, steps=50)[0])
    z = model.encode('def f(x):\n    return x\n')      # [N, Z] numpy latents
    print(model.decode(z))

    baseline = tokcom_jax.load('runs/tiny/ar')          # the autoregressive stage
    print(baseline.generate(2, prompt='def ')[0])

Compiled functions are cached per (batch size, number of chunks, sampling options);
the number of Euler steps is a traced value, so changing it does not recompile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from tokcom_jax import stages
from tokcom_jax.data.tokenizer import ids_text, text_ids
from tokcom_jax.errors import SamplingError
from tokcom_jax.inference import chunk_generation
from tokcom_jax.inference.autoregressive import batch_starts, check_counts
from tokcom_jax.models import flow, samplers, static
from tokcom_jax.models.decoding import choose_tokens

Array = jax.Array


class TokCom:
  """A trained TokCom: the VAE always, the flow model when stage 2 was trained."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer, vae_params,
               dit_params=None, workdir: str = '', vae_workdir: str = '',
               vae_config: ml_collections.ConfigDict | None = None):
    """`vae_config`: what the VAE was trained with, when not `config` (a stage-2
    run's VAE is built as its own run was: `stages.vae.trained_config`)."""
    self.config, self.tokenizer, self.workdir = config, tokenizer, workdir
    self.vae_workdir = vae_workdir or workdir
    graphdef = lambda c, stage: nnx.graphdef(nnx.eval_shape(
        lambda: stages.get(c, stage).build(nnx.Rngs(0))))
    self.vae_graphdef = graphdef(vae_config or config, 'vae')
    self.vae_params, self.dit_params = vae_params, dit_params
    if dit_params is not None:
      self.dit_graphdef = graphdef(config, 'diffusion')
      # What compiled samplers take as static arguments: hashed by identity.
      self.static_graphdefs = (static.Static(self.dit_graphdef),
                               static.Static(self.vae_graphdef))
    self.chunk_size = config.chunk_size
    self.max_chunks = config.max_length // config.chunk_size
    self.latent_dim = config.vae.latent_dim
    # Partial chunks are filled with EOS: training windows hold EOS between
    # documents but never a pad token, so EOS is what the encoder knows.
    self.fill_id = tokenizer.eos_token_id
    self._flow_cfg = flow.FlowConfig.from_config(config)

  # ----- jitted pieces (cached per static argument and input shape)

  @functools.cached_property
  def _encode(self):
    return jax.jit(lambda p, tokens: nnx.merge(self.vae_graphdef, p).encode(tokens)[0])

  @functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
  def _decode(self, params, z_BNZ, key, temperature, top_k, top_p):
    vae = nnx.merge(self.vae_graphdef, params)
    return vae.decode_tokens(z_BNZ, lambda logits, k: choose_tokens(
        logits, jax.random.fold_in(key, k), temperature, top_k, top_p))[0]

  @functools.partial(jax.jit, static_argnums=0)
  def _sample_latents(self, dit_params, x0_BNZ, steps, known_mask_BN, known_BNZ):
    """Noise (in the flow's units) → VAE latents; `known_BNZ` are VAE latents."""
    model = nnx.merge(self.dit_graphdef, dit_params)
    x = samplers.generate(model, x0_BNZ, steps, self._flow_cfg,
                          known_mask_BN=known_mask_BN,
                          known_BNZ=model.to_flow(known_BNZ))
    # Held chunks exactly as given (the round trip through the flow's units rounds).
    return jnp.where(known_mask_BN[..., None], known_BNZ, model.to_latent(x))

  @functools.partial(jax.jit, static_argnums=0)
  def _sample_latents_with_prefix(self, dit_params, vae_params, x0_BNZ, steps,
                                  known_mask_BN, known_BNZ, prefix_BL, prefix_mask_BL,
                                  prompt_BMZ):
    """`_sample_latents` for a prompt that ends inside a chunk: each prediction of
    x1 is moved, by a few normalized gradient steps on that chunk's latent only,
    toward latents whose decoding starts with the prompt's last tokens."""
    model = nnx.merge(self.dit_graphdef, dit_params)
    vae = nnx.merge(self.vae_graphdef, vae_params)
    K = self.chunk_size
    B, N, _ = x0_BNZ.shape
    partial_BN1 = prefix_mask_BL.reshape(B, N, K).max(-1, keepdims=True)

    def prefix_ce(x_BNZ):
      logits = vae.decode(model.to_latent(x_BNZ), prefix_BL)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, prefix_BL)
      return (ce * prefix_mask_BL).sum()

    # Steps of a fixed share of the latents' own size, measured on the prompt's.
    size = jnp.sqrt(jnp.mean(jnp.square(model.to_flow(prompt_BMZ)))) + 1e-6

    x = samplers.generate(model, x0_BNZ, steps, self._flow_cfg,
                          known_mask_BN=known_mask_BN,
                          known_BNZ=model.to_flow(known_BNZ),
                          refine=samplers.prefix_guidance(prefix_ce, size, partial_BN1),
                          refine_chunks_N=partial_BN1.max(axis=(0, 2)) > 0)
    # Held chunks exactly as given (the round trip through the flow's units rounds).
    return jnp.where(known_mask_BN[..., None], known_BNZ, model.to_latent(x))

  # ----- text ↔ tokens

  def _tokens(self, text: str) -> np.ndarray:
    return text_ids(self.tokenizer, text)

  def text(self, ids) -> str:
    """Token ids → text (special tokens dropped)."""
    return ids_text(self.tokenizer, ids)

  # ----- public API

  def encode(self, text: str) -> np.ndarray:
    """Text → latents [N, Z], N = ceil(tokens / chunk_size), window by window."""
    ids = self._tokens(text)
    K, W = self.chunk_size, self.config.max_length
    padded = np.full((-(-len(ids) // W)) * W, self.fill_id, np.int32)
    padded[:len(ids)] = ids
    z = self._encode(self.vae_params, jnp.asarray(padded.reshape(-1, W)))
    return np.asarray(z).reshape(-1, self.latent_dim)[:-(-len(ids) // K)]

  def decode(self, latents, *, seed: int = 0, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0) -> str:
    """Latents [N, Z] → text (all chunks decoded in parallel)."""
    z = np.asarray(latents)
    if z.ndim != 2 or z.shape[-1] != self.latent_dim or not np.issubdtype(
        z.dtype, np.floating):
      raise SamplingError(f'latents must be a float array [N, {self.latent_dim}];'
                          f' got {z.dtype} {list(z.shape)}.')
    if not np.isfinite(z).all():
      raise SamplingError('latents must be finite; these hold NaN or inf.')
    tokens = self._decode(self.vae_params, jnp.asarray(z, jnp.float32)[None],
                          jax.random.key(seed), temperature, top_k, top_p)
    return self.text(tokens[0])

  def reconstruct(self, text: str, **sampling) -> str:
    ids = self._tokens(text)
    z = self.encode(text)
    tokens = self._decode(self.vae_params, jnp.asarray(z)[None],
                          jax.random.key(sampling.pop('seed', 0)),
                          sampling.get('temperature', 0.0), sampling.get('top_k', 0),
                          sampling.get('top_p', 1.0))
    return self.text(np.asarray(tokens[0])[:len(ids)])

  def sample(self, num_samples: int = 1, num_chunks: int | None = None,
             steps: int | None = None, seed: int = 0, prompt: str | None = None,
             batch_size: int | None = None, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, noise_scale: float | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Like `generate`, but returns arrays: latents [S, N, Z] and tokens [S, N·K].

    With a prompt, its whole chunks are held (their latents ride their own path to
    the encoder's latents); a chunk the prompt ends inside is generated under
    guidance toward its known first tokens; the prompt's tokens come back verbatim."""
    if self.dit_params is None:
      raise SamplingError(f'{self.workdir} is a stage-1 (VAE) run: generation needs'
                          ' a stage-2 run (train.py --config …:diffusion).')
    N = num_chunks or self.max_chunks
    if not 0 < N <= self.max_chunks:
      raise SamplingError(f'num_chunks {N} must be between 1 and {self.max_chunks},'
                          ' the number the model was trained on.')
    steps = self.config.sample.steps if steps is None else steps
    if steps < 1:
      raise SamplingError(f'steps must be a positive number, got {steps}.')
    noise_scale = self.config.sample.noise_scale if noise_scale is None else noise_scale
    if not noise_scale > 0:
      raise SamplingError(f'noise_scale must be positive, got {noise_scale}.')
    check_counts(num_samples, batch_size)
    K, Z = self.chunk_size, self.latent_dim
    prompt_ids, known_mask, known, prompt_z = self._prompt(prompt, N)
    held, rest = divmod(len(prompt_ids), K)
    if self._flow_cfg.order == 'head':
      return chunk_generation.sample(
          self, num_samples, batch_size or num_samples, N, steps, seed, noise_scale,
          prompt_ids, known_mask, prompt_z, (temperature, top_k, top_p))
    # A prompt that ends inside a chunk: that chunk is generated toward its known
    # first tokens (guidance), and they are written back verbatim.
    prefix = np.zeros((N * K,), np.int32)
    prefix_mask = np.zeros((N * K,), np.float32)
    prefix[held * K:len(prompt_ids)] = prompt_ids[held * K:]
    prefix_mask[held * K:len(prompt_ids)] = 1.0
    batch_size = batch_size or num_samples
    latents, tokens = [], []
    for first in batch_starts(num_samples, batch_size):
      B = min(batch_size, num_samples - first)
      key = jax.random.fold_in(jax.random.key(seed), first)
      x0 = flow.sample_noise(key, (B, N, Z), self.config.flow.noise_std * noise_scale)
      args = (jnp.broadcast_to(known_mask, (B, N)), jnp.broadcast_to(known, (B, N, Z)))
      if rest:
        z = self._sample_latents_with_prefix(
            self.dit_params, self.vae_params, x0, steps, *args,
            jnp.broadcast_to(prefix, (B, N * K)),
            jnp.broadcast_to(prefix_mask, (B, N * K)), jnp.asarray(prompt_z)[None])
      else:
        z = self._sample_latents(self.dit_params, x0, steps, *args)
      out = np.array(self._decode(self.vae_params, z, jax.random.fold_in(key, 1),
                                  temperature, top_k, top_p))
      out[:, :len(prompt_ids)] = prompt_ids  # the prompt is never resampled
      tokens.append(out)
      latents.append(np.asarray(z))
    return np.concatenate(latents), np.concatenate(tokens)

  def _prompt(self, prompt: str | None, N: int):
    """(token ids, held chunks [N], their latents [N, Z], the prompt's latents with
    a partial last chunk padded [P/K, Z]) of a prompt for N chunks."""
    K, Z = self.chunk_size, self.latent_dim
    known_mask, known = np.zeros((N,), bool), np.zeros((N, Z), np.float32)
    if not prompt:
      return np.zeros((0,), np.int32), known_mask, known, known
    ids = self._tokens(prompt)
    if -(-len(ids) // K) >= N:
      raise SamplingError(f'the prompt is {len(ids)} tokens, which leaves nothing of'
                          f' {N} chunks of {K} to generate: shorten it.')
    prompt_z = self.encode(prompt)  # its last chunk padded when partial
    held = len(ids) // K
    known[:held], known_mask[:held] = prompt_z[:held], True
    return ids, known_mask, known, prompt_z

  def sample_batch(self, requests, num_chunks: int, steps: int | None = None,
                   noise_scale: float | None = None, pad_to: int = 0
                   ) -> list[np.ndarray]:
    """Token ids [n, N·K] for each of several requests (n, seed, prompt), drawn in
    one batch (a chunk generator, argmax decoding) padded to `pad_to` rows: each is
    what `sample(n, num_chunks, steps, seed, prompt, noise_scale=…)` gives (to the
    last bit where the batch has n rows; else to float rounding, ~1e-6 in the
    latents). Prompts end at a chunk boundary (`chunk_generation.sample_rows`)."""
    steps = self.config.sample.steps if steps is None else steps
    noise_scale = self.config.sample.noise_scale if noise_scale is None else noise_scale
    rows, sizes = [], []
    for n, seed, prompt in requests:
      ids, known_mask, _, prompt_z = self._prompt(prompt, num_chunks)
      rows += [(seed, i, ids, known_mask, prompt_z) for i in range(n)]
      sizes.append(n)
    _, tokens = chunk_generation.sample_rows(self, rows, num_chunks, steps, noise_scale,
                                             (0.0, 0, 1.0), pad_to)
    return np.split(tokens, np.cumsum(sizes)[:-1])

  def generate(self, num_samples: int = 1, num_chunks: int | None = None,
               steps: int | None = None, seed: int = 0, prompt: str | None = None,
               batch_size: int | None = None, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, noise_scale: float | None = None
               ) -> list[str]:
    """Samples texts from noise; with `prompt`, its chunks are held fixed and the
    prompt is returned unchanged as the start of each text. `noise_scale` (default:
    the run's `sample.noise_scale`) scales the starting noise: < 1 trades diversity
    for samples nearer the data's modes."""
    _, tokens = self.sample(num_samples, num_chunks, steps, seed, prompt, batch_size,
                            temperature, top_k, top_p, noise_scale)
    if not prompt:
      return [self.text(row) for row in tokens]
    skip = len(self._tokens(prompt))
    return [prompt + self.text(row[skip:]) for row in tokens]

  def encode_tokens(self, tokens_BL) -> np.ndarray:
    """Token windows [B, L] (L a multiple of chunk_size) → latent means [B, L/K, Z]."""
    return np.asarray(self._encode(self.vae_params, jnp.asarray(tokens_BL, jnp.int32)))

  def decode_tokens(self, latents_BNZ) -> np.ndarray:
    """Latents [B, N, Z] → argmax tokens [B, N·K]."""
    return np.asarray(self._decode(self.vae_params,
                                   jnp.asarray(latents_BNZ, jnp.float32),
                                   jax.random.key(0), 0.0, 0, 1.0))
