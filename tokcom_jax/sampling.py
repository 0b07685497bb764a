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
from etils import epath
from flax import nnx

from tokcom_jax import checkpoint, flow, lm, sharding, stages, train_state
from tokcom_jax.decoding import choose_tokens
from tokcom_jax.errors import CheckpointError, SamplingError
from tokcom_jax.tokenizer import load_tokenizer

Array = jax.Array


class TokCom:
  """A trained TokCom: the VAE always, the flow model when stage 2 was trained."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer, vae_params,
               dit_params=None, workdir: str = '', vae_workdir: str = ''):
    self.config, self.tokenizer, self.workdir = config, tokenizer, workdir
    self.vae_workdir = vae_workdir or workdir
    graphdef = lambda stage: nnx.graphdef(nnx.eval_shape(
        lambda: stages.get(config, stage).build(nnx.Rngs(0))))
    self.vae_graphdef = graphdef('vae')
    self.vae_params, self.dit_params = vae_params, dit_params
    if dit_params is not None:
      self.dit_graphdef = graphdef('diffusion')
    self.chunk_size = config.chunk_size
    self.max_chunks = config.max_length // config.chunk_size
    self.latent_dim = config.vae.latent_dim
    # Partial chunks are filled with EOS: training windows hold EOS between
    # documents but never a pad token, so EOS is what the encoder knows.
    self.fill_id = tokenizer.eos_token_id

  # ----- jitted pieces (cached per static argument and input shape)

  @functools.cached_property
  def _encode(self):
    return jax.jit(lambda p, tokens: nnx.merge(self.vae_graphdef, p).encode(tokens)[0])

  @functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
  def _decode(self, params, z_BNZ, key, temperature, top_k, top_p):
    logits = nnx.merge(self.vae_graphdef, params).decode(z_BNZ)
    return choose_tokens(logits, key, temperature, top_k, top_p)

  @functools.partial(jax.jit, static_argnums=0)
  def _sample_latents(self, dit_params, x0_BNZ, steps, known_mask_BN, known_BNZ):
    model = nnx.merge(self.dit_graphdef, dit_params)
    return flow.euler_sample(model, x0_BNZ, steps, known_mask_BN=known_mask_BN,
                             known_BNZ=known_BNZ)

  # ----- text ↔ tokens

  def _tokens(self, text: str) -> np.ndarray:
    return _tokens(self.tokenizer, text)

  def _text(self, ids) -> str:
    return _text(self.tokenizer, ids)

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
    tokens = self._decode(self.vae_params, jnp.asarray(z, jnp.float32)[None],
                          jax.random.key(seed), temperature, top_k, top_p)
    return self._text(tokens[0])

  def reconstruct(self, text: str, **sampling) -> str:
    ids = self._tokens(text)
    z = self.encode(text)
    tokens = self._decode(self.vae_params, jnp.asarray(z)[None],
                          jax.random.key(sampling.pop('seed', 0)),
                          sampling.get('temperature', 0.0), sampling.get('top_k', 0),
                          sampling.get('top_p', 1.0))
    return self._text(np.asarray(tokens[0])[:len(ids)])

  def sample(self, num_samples: int = 1, num_chunks: int | None = None,
             steps: int = 50, seed: int = 0, prompt: str | None = None,
             batch_size: int | None = None, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Like `generate`, but returns arrays: latents [S, N, Z] and tokens [S, N·K]
    (with a prompt, its whole chunks are held and the rest generated)."""
    if self.dit_params is None:
      raise SamplingError(f'{self.workdir} is a stage-1 (VAE) run: generation needs'
                          ' a stage-2 run (train.py --config …:diffusion).')
    N = num_chunks or self.max_chunks
    if not 0 < N <= self.max_chunks:
      raise SamplingError(f'num_chunks {N} must be between 1 and {self.max_chunks},'
                          ' the number the model was trained on.')
    if steps < 1:
      raise SamplingError(f'steps must be a positive number, got {steps}.')
    _check_counts(num_samples, batch_size)
    K, Z = self.chunk_size, self.latent_dim
    known_mask = np.zeros((N,), bool)
    known = np.zeros((N, Z), np.float32)
    if prompt:
      prompt_ids = self._tokens(prompt)
      held = len(prompt_ids) // K
      if -(-len(prompt_ids) // K) >= N:
        raise SamplingError(f'the prompt is {len(prompt_ids)} tokens, which leaves'
                            f' nothing of {N} chunks of {K} to generate: shorten it.')
      known[:held] = self.encode(prompt)[:held]
      known_mask[:held] = True
    batch_size = batch_size or num_samples
    latents, tokens = [], []
    for first in range(0, num_samples, batch_size):
      B = min(batch_size, num_samples - first)
      key = jax.random.fold_in(jax.random.key(seed), first)
      x0 = flow.sample_noise(key, (B, N, Z), self.config.flow.noise_std)
      z = self._sample_latents(self.dit_params, x0, steps,
                               jnp.broadcast_to(known_mask, (B, N)),
                               jnp.broadcast_to(known, (B, N, Z)))
      tokens.append(np.asarray(self._decode(
          self.vae_params, z, jax.random.fold_in(key, 1), temperature, top_k, top_p)))
      latents.append(np.asarray(z))
    return np.concatenate(latents), np.concatenate(tokens)

  def generate(self, num_samples: int = 1, num_chunks: int | None = None,
               steps: int = 50, seed: int = 0, prompt: str | None = None,
               batch_size: int | None = None, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0) -> list[str]:
    """Samples texts from noise; with `prompt`, its chunks are held fixed and the
    prompt is returned unchanged as the start of each text."""
    _, tokens = self.sample(num_samples, num_chunks, steps, seed, prompt, batch_size,
                            temperature, top_k, top_p)
    if not prompt:
      return [self._text(row) for row in tokens]
    skip = len(self._tokens(prompt))
    return [prompt + self._text(row[skip:]) for row in tokens]

  def encode_tokens(self, tokens_BL) -> np.ndarray:
    """Token windows [B, L] (L a multiple of chunk_size) → latent means [B, L/K, Z]."""
    return np.asarray(self._encode(self.vae_params, jnp.asarray(tokens_BL, jnp.int32)))

  def decode_tokens(self, latents_BNZ) -> np.ndarray:
    """Latents [B, N, Z] → argmax tokens [B, N·K]."""
    return np.asarray(self._decode(self.vae_params,
                                   jnp.asarray(latents_BNZ, jnp.float32),
                                   jax.random.key(0), 0.0, 0, 1.0))


class AutoregressiveLM:
  """A trained autoregressive baseline (an `ar` run): generate text, score text.

  A sample starts after EOS, the token that separates documents in the training
  stream, so that it begins where a document begins; a prompt follows the EOS.
  """

  def __init__(self, config: ml_collections.ConfigDict, tokenizer, params,
               workdir: str = ''):
    self.config, self.tokenizer, self.params, self.workdir = (
        config, tokenizer, params, workdir)
    self.graphdef = nnx.graphdef(nnx.eval_shape(
        lambda: stages.get(config, 'ar').build(nnx.Rngs(0))))
    self.max_length = config.max_length
    self.eos = tokenizer.eos_token_id

  @functools.partial(jax.jit, static_argnums=0)
  def _token_ce(self, params, tokens_BT):
    return lm.token_ce(nnx.merge(self.graphdef, params), tokens_BT)

  def sample(self, num_samples: int = 1, num_tokens: int | None = None,
             seed: int = 0, prompt: str | None = None, batch_size: int | None = None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
             ) -> np.ndarray:
    """Token ids [S, P + num_tokens]: the prompt's P tokens, then the new ones
    (default: as many as fit in the trained context of max_length)."""
    prompt_ids = _tokens(self.tokenizer, prompt) if prompt else np.zeros(0, np.int32)
    room = self.max_length - 1 - len(prompt_ids)
    num_tokens = room if num_tokens is None else num_tokens
    if room < 1:
      raise SamplingError(f'the prompt is {len(prompt_ids)} tokens, which leaves'
                          f' nothing of the {self.max_length}-token context: shorten it.')
    if not 0 < num_tokens <= room:
      raise SamplingError(f'num_tokens {num_tokens} must be between 1 and {room}'
                          ' (the trained context less the prompt).')
    _check_counts(num_samples, batch_size)
    batch_size = batch_size or num_samples
    P, out = len(prompt_ids), []
    for first in range(0, num_samples, batch_size):
      B = min(batch_size, num_samples - first)
      buffer = np.full((B, self.max_length), self.eos, np.int32)
      buffer[:, 1:1 + P] = prompt_ids
      tokens = lm.generate(self.graphdef, self.params, buffer, 1 + P,
                           jax.random.fold_in(jax.random.key(seed), first),
                           max_new_tokens=num_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p)
      out.append(np.asarray(tokens)[:, 1:1 + P + num_tokens])
    return np.concatenate(out)

  def generate(self, num_samples: int = 1, num_tokens: int | None = None,
               seed: int = 0, prompt: str | None = None, batch_size: int | None = None,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
               ) -> list[str]:
    """Texts sampled token by token (KV cache); with `prompt`, each starts with it."""
    tokens = self.sample(num_samples, num_tokens, seed, prompt, batch_size,
                         temperature, top_k, top_p)
    skip = len(_tokens(self.tokenizer, prompt)) if prompt else 0
    return [(prompt or '') + _text(self.tokenizer, row[skip:]) for row in tokens]

  def token_ce(self, token_lists, batch_size: int = 32) -> list[np.ndarray]:
    """Per-token cross-entropy (nats) of each token sequence under this model, each
    token predicted from EOS and the tokens before it; sequences longer than the
    context less one are cut to it."""
    L = self.max_length
    rows = [np.concatenate([[self.eos], np.asarray(t, np.int32)[:L - 1]])
            for t in token_lists]
    out = []
    for first in range(0, len(rows), batch_size):
      batch = rows[first:first + batch_size]
      buffer = np.full((len(batch), L), self.eos, np.int32)
      for i, r in enumerate(batch):
        buffer[i, :len(r)] = r
      ce = np.asarray(self._token_ce(self.params, jnp.asarray(buffer)))
      out.extend(ce[i, :len(r) - 1] for i, r in enumerate(batch))
    return out


def _check_counts(num_samples: int, batch_size: int | None) -> None:
  if num_samples < 1:
    raise SamplingError(f'num_samples must be a positive number, got {num_samples}.')
  if batch_size is not None and batch_size < 1:
    raise SamplingError(f'batch_size must be a positive number, got {batch_size}.')


def _tokens(tokenizer, text: str) -> np.ndarray:
  if not text or not text.strip():
    raise SamplingError('the input text is empty: pass some text.')
  ids = tokenizer(text, add_special_tokens=False)['input_ids']
  if not ids:
    raise SamplingError('the input text tokenizes to nothing: pass other text.')
  return np.asarray(ids, np.int32)


def _text(tokenizer, ids) -> str:
  return tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=True)


def _config_from_meta(meta: dict) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(meta['config'])
  config.lock()
  return config


def load(workdir: str) -> TokCom | AutoregressiveLM:
  """Loads what train.py wrote in `workdir`: a TokCom (from a stage-2 run, or the
  VAE alone from a stage-1 run) or the autoregressive baseline (an `ar` run)."""
  _, meta = checkpoint.read_meta(workdir)
  config = _config_from_meta(meta)
  tokenizer_dir = meta['tokenizer_dir']
  if not (epath.Path(tokenizer_dir) / 'tokenizer_config.json').exists():
    raise CheckpointError(f'the tokenizer of {workdir} is missing from'
                          f' {tokenizer_dir}.')
  tokenizer = load_tokenizer(config.tokenizer, tokenizer_dir)
  mesh = sharding.make_mesh(-1, 1)
  restore = lambda run, stage: checkpoint.restore_params(
      run, train_state.abstract_params(stages.get(config, stage).build, mesh)[1])[0]
  if meta['stage'] == 'ar':
    return AutoregressiveLM(config, tokenizer, restore(workdir, 'ar'),
                            workdir=str(workdir))
  if meta['stage'] == 'vae':
    return TokCom(config, tokenizer, restore(workdir, 'vae'), workdir=str(workdir))
  # Runs written before frozen models were recorded by name kept `vae_workdir`.
  vae_dir = meta.get('frozen', {}).get('vae') or meta.get('vae_workdir')
  return TokCom(config, tokenizer, restore(vae_dir, 'vae'),
                restore(workdir, meta['stage']), workdir=str(workdir),
                vae_workdir=str(vae_dir))
