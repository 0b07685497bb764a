"""Sampling from a TokCom run whose stage 2 is a chunk generator (`flow.order =
'head'`): the whole sequence in one compiled loop (`samplers.head_sample`), each
chunk decoded with the sampling options and fed back to the trunk; and the
teacher-forced draws that BrierLM scores (each chunk drawn given the real chunks
before it)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from tokcom_jax.inference.autoregressive import batch_starts
from tokcom_jax.models import flow, samplers, static
from tokcom_jax.models.decoding import choose_tokens

Array = jax.Array


def _prompt_rows(N, K, Z, prompt_ids, known_mask, prompt_z) -> tuple[np.ndarray, ...]:
  """One sample's prompt arrays: (held chunks [N], their latents [N, Z], prompt
  tokens [N·K], which tokens are the prompt's [N·K])."""
  prompt = np.zeros((N * K,), np.int32)
  prompt_mask = np.zeros((N * K,), bool)
  prompt[:len(prompt_ids)] = prompt_ids
  prompt_mask[:len(prompt_ids)] = True
  known = np.zeros((N, Z), np.float32)
  known[:len(prompt_z)] = prompt_z
  return np.asarray(known_mask, bool), known, prompt, prompt_mask


def sample(model, num_samples, batch_size, N, steps, seed, noise_scale, prompt_ids,
           known_mask, prompt_z, choosing) -> tuple[np.ndarray, np.ndarray]:
  """`TokCom.sample` for a chunk generator: the prompt's tokens are fed to the trunk
  as they are; a chunk the prompt ends inside keeps them and the rest of it comes
  from its latent, drawn under guidance toward them. (latents [S, N, Z], tokens)."""
  K, Z = model.chunk_size, model.latent_dim
  one = _prompt_rows(N, K, Z, prompt_ids, known_mask, prompt_z)
  latents, tokens = [], []
  # A long sample (many steps) counts its chunks as they are drawn.
  progress = steps * N >= LONG_SAMPLE
  _BAR[0] = tqdm(total=N * -(-num_samples // batch_size), desc='sampling', unit='chunk',
                 delay=2, leave=False, disable=not progress)
  for first in range(0, num_samples, batch_size) if progress else batch_starts(
      num_samples, batch_size):
    B = min(batch_size, num_samples - first)
    z, out = _call(model, np.full((B,), seed, np.uint32),
                   np.arange(first, first + B, dtype=np.int32), noise_scale,
                   [np.broadcast_to(a, (B,) + a.shape) for a in one], steps,
                   guide=len(prompt_ids) % K > 0, choosing=choosing,
                   prompted=len(prompt_ids) > 0, progress=progress)
    latents.append(np.asarray(z))
    tokens.append(np.asarray(out))
  _BAR[0].close()
  return np.concatenate(latents), np.concatenate(tokens)


def sample_rows(model, rows, N, steps, noise_scale, choosing, pad_to: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
  """Samples of several requests in one batch: `rows` are (seed, index, prompt ids,
  held chunks [N], prompt latents) each, and row (seed, i) is sample i of
  `sample(…, seed)` with that prompt. Prompts must fill whole chunks (a chunk's
  guidance toward a partial prompt reads the whole batch). The batch is padded to
  `pad_to` rows (copies of the first), so that a few batch sizes are compiled.
  (latents, tokens) of `rows`."""
  K, Z = model.chunk_size, model.latent_dim
  if any(len(ids) % K for _, _, ids, _, _ in rows):
    raise ValueError('sample_rows: prompts must end at a chunk boundary')
  padded = list(rows) + [rows[0]] * max(pad_to - len(rows), 0)
  arrays = [np.stack(a) for a in zip(*(_prompt_rows(N, K, Z, *r[2:]) for r in padded))]
  z, tokens = _call(model, np.asarray([r[0] for r in padded], np.uint32),
                    np.asarray([r[1] for r in padded], np.int32), noise_scale, arrays,
                    steps, guide=False, choosing=choosing,
                    prompted=any(len(r[2]) for r in rows), progress=False)
  return np.asarray(z)[:len(rows)], np.asarray(tokens)[:len(rows)]


def _call(model, seeds_B, index_B, noise_scale, arrays, steps, *, guide, choosing,
          prompted, progress):
  return _draw(
      *model.static_graphdefs, model.config.flow.sample_shift,
      model.dit_params, model.vae_params, seeds_B, index_B,
      np.float32(model.config.flow.noise_std * noise_scale), *arrays,
      steps=int(steps), guide=guide, choosing=tuple(choosing), prompted=prompted,
      progress=progress)


LONG_SAMPLE = 4096  # head steps per sample (steps × chunks) from which chunks are counted
_BAR = [None]  # the progress bar the compiled sampler's callback advances


def _chunk_drawn(n) -> None:
  if _BAR[0] is not None:
    _BAR[0].update(1)


@functools.partial(jax.jit, static_argnums=(0, 1, 2),
                   static_argnames=('steps', 'guide', 'choosing', 'prompted',
                                    'progress'))
def _draw(dit_graphdef, vae_graphdef, shift, dit_params, vae_params, seeds_B, index_B,
          noise_std, known_mask_BN, known_BNZ, prompt_BL, prompt_mask_BL, *, steps,
          guide, choosing, prompted, progress):
  """Samples (seed_b, index_b) of each row b: their noise and keys drawn here, in
  the same program as the sampler (at batch 1 each call outside it costs). A row's
  starting noise comes from key (seed, index) alone, so a flow head's sample is the
  same in any batch; decoding at temperature > 0 draws with the first row's key."""
  row_key = lambda seed, i: jax.random.fold_in(jax.random.key(seed), i)
  N, Z = known_BNZ.shape[1:]
  x0 = jax.vmap(lambda seed, i: flow.sample_noise(
      jax.random.fold_in(row_key(seed, i), 0), (N, Z), noise_std))(seeds_B, index_B)
  key = jax.random.fold_in(row_key(seeds_B[0], index_B[0]), 1)
  return _sample(dit_graphdef, vae_graphdef, shift, dit_params, vae_params, x0, steps,
                 key, known_mask_BN, known_BNZ, prompt_BL, prompt_mask_BL, guide,
                 *choosing, prompted, progress)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 6, 12, 13, 14, 15, 16, 17))
def _sample(dit_graphdef, vae_graphdef, shift, dit_params, vae_params, x0_BNZ, steps,
            key, known_mask_BN, known_BNZ, prompt_BL, prompt_mask_BL, guide,
            temperature, top_k, top_p, prompted, progress=False):
  """Latents (VAE units) and tokens; with `guide`, the chunk the prompt ends inside
  is drawn under guidance toward its known tokens (`samplers.prefix_guidance`)."""
  model = nnx.merge(static.graphdef(dit_graphdef), dit_params)
  vae = nnx.merge(static.graphdef(vae_graphdef), vae_params)
  B, N, _ = x0_BNZ.shape
  K = prompt_BL.shape[1] // N

  def decode(z_BTZ, n_T):
    """Tokens [B, T, K] of chunks n_T, token k of chunk n drawn with key (n, k)."""
    def choose(logits_BTV, k):
      keys_T = jax.vmap(lambda n: jax.random.fold_in(jax.random.fold_in(key, n), k))(n_T)
      return jax.vmap(lambda logits_BV, key: choose_tokens(
          logits_BV, key, temperature, top_k, top_p), in_axes=(1, 0), out_axes=1)(
              logits_BTV, keys_T)
    return vae.decode_tokens(z_BTZ, choose)[0].reshape(z_BTZ.shape[0], -1, K)

  refine = refine_chunks_N = None
  if guide:  # the prompt's tokens in a chunk it does not fill
    partial_BNK = prompt_mask_BL.reshape(B, N, K) * ~known_mask_BN[..., None]
    at = lambda a, n: jax.lax.dynamic_index_in_dim(a, n, 1, keepdims=False)
    # Steps of a fixed share of the latents' own size, measured on the prompt's
    # (`known_BNZ` holds the partial chunk's encoding too, padded; never held).
    in_prompt_BN1 = prompt_mask_BL.reshape(B, N, K).max(-1, keepdims=True) > 0
    size = jnp.sqrt(jnp.mean(jnp.square(model.to_flow(known_BNZ)),
                             where=in_prompt_BN1)) + 1e-6

    def refine(x1_BZ, n):
      tokens_BK, mask_BK = at(prompt_BL.reshape(B, N, K), n), at(partial_BNK, n)

      def prefix_ce(x_BZ):
        logits = vae.decode(model.to_latent(x_BZ)[:, None], tokens_BK)
        return (optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BK)
                * mask_BK).sum()
      return samplers.prefix_guidance(prefix_ce, size, jnp.ones((B, 1)))(x1_BZ)
    refine_chunks_N = partial_BNK.max(axis=(0, 2)) > 0
  held = {} if not prompted else dict(
      known_mask_BN=known_mask_BN, known_BNZ=model.to_flow(known_BNZ),
      known_tokens_BL=prompt_BL, known_token_mask_BL=prompt_mask_BL)
  x_BNZ, tokens_BL = samplers.head_sample(  # without a prompt, no held-chunk code
      model, decode, x0_BNZ, steps, key, shift=shift, refine=refine,
      refine_chunks_N=refine_chunks_N, on_chunk=_chunk_drawn if progress else None,
      **held)
  # Held chunks exactly as given (the round trip through the flow's units rounds).
  return (jnp.where(known_mask_BN[..., None], known_BNZ, model.to_latent(x_BNZ)),
          tokens_BL)


def teacher_forced_chunks(model, tokens_BL, key: Array, steps: int,
                          noise_scale: float) -> np.ndarray:
  """Token ids [B, N·K]: chunk n drawn (argmax decoding) given the real chunks < n
  of `tokens_BL`, every chunk at once (one trunk pass, the head on all states)."""
  Z = model.latent_dim
  B, L = np.shape(tokens_BL)
  x0 = flow.sample_noise(key, (B * (L // model.chunk_size), Z),
                         model.config.flow.noise_std * noise_scale)
  return np.asarray(_teacher_forced(
      model.dit_graphdef, model.vae_graphdef, model.config.flow.sample_shift,
      model.dit_params, model.vae_params, jnp.asarray(tokens_BL, jnp.int32), x0,
      steps, jax.random.fold_in(key, 1)))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _teacher_forced(dit_graphdef, vae_graphdef, shift, dit_params, vae_params,
                    tokens_BL, x0_MZ, steps, key):
  model = nnx.merge(dit_graphdef, dit_params)
  vae = nnx.merge(vae_graphdef, vae_params)
  x1_BNZ = model.to_flow(vae.encode(tokens_BL)[0])
  B, N, Z = x1_BNZ.shape
  h_MD = model.states(tokens_BL, x1_BNZ).reshape(B * N, -1)
  x_MZ = samplers.head_latents(model, h_MD, x0_MZ, steps, key, shift=shift)
  return jnp.argmax(vae.decode(model.to_latent(x_MZ.reshape(B, N, Z))), axis=-1)
