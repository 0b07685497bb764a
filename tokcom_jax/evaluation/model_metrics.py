"""Model metrics of a trained run on held-out windows: the VAE's reconstruction and
how it degrades with latent noise, the flow model's loss terms at fixed times, and
statistics of generated windows against as many real ones."""

from __future__ import annotations

import time

import numpy as np

from tokcom_jax.evaluation.text_metrics import (distinct_n, frechet_latent_distance,
                                                repeat_ngram_rate, unigram_entropy)

NOISE_LEVELS = (0.0, 0.1, 0.3, 0.5, 1.0)



def batched(fn, rows: np.ndarray, batch_size: int) -> np.ndarray:
  """fn over `rows` [R, ...] in batches of at most `batch_size`, concatenated."""
  return np.concatenate([fn(rows[first:first + batch_size])
                         for first in range(0, len(rows), batch_size)])


def vae_metrics(model, windows_BL: np.ndarray, batch_size: int, seed: int = 0
                ) -> dict:
  """Reconstruction of held-out windows, and how it degrades with latent noise."""
  K = model.chunk_size
  latents = batched(model.encode_tokens, windows_BL, batch_size)
  std_Z = latents.reshape(-1, latents.shape[-1]).std(0)
  rng = np.random.default_rng(seed)
  curve = {}
  for sigma in NOISE_LEVELS:
    noisy = latents + sigma * std_Z * rng.standard_normal(latents.shape).astype(
        np.float32)
    tokens = batched(model.decode_tokens, noisy, batch_size)
    right = tokens == windows_BL
    curve[str(sigma)] = float(right.mean())
    if sigma == 0.0:
      exact = right.reshape(len(right), -1, K).all(-1).mean()
  return {'recon_token_accuracy': curve['0.0'],
          'recon_chunk_exact_match': float(exact),
          'recon_token_accuracy_at_noise': curve,
          'latent_std_mean': float(std_Z.mean())}


def flow_metrics(model, windows_BL: np.ndarray, batch_size: int, seed: int = 0
                 ) -> dict:
  """Stage-2 CE and MSE on held-out windows at fixed t: the eval step that training
  runs (`tokcom_jax.training.steps`), over these windows."""
  import jax
  import jax.numpy as jnp

  from tokcom_jax import stages
  from tokcom_jax.stages.flow import EVAL_TIMES
  from tokcom_jax.training import sharding, steps

  stage = stages.get(model.config, 'diffusion')
  eval_step = steps.make_eval_step(stage, model.dit_graphdef,
                                   {'vae': model.vae_graphdef}, sharding.make_mesh(-1, 1))
  batches = ((jnp.asarray(windows_BL[first:first + batch_size]),
              jax.random.fold_in(jax.random.key(seed), i))
             for i, first in enumerate(range(0, len(windows_BL), batch_size)))
  ev = steps.evaluate_batches(eval_step, model.dit_params, {'vae': model.vae_params},
                              batches)
  times = [t for t in EVAL_TIMES if f'ce_t{t}' in ev]  # none: an energy head
  out = {'val_ce': {str(t): ev[f'ce_t{t}'] for t in times} or {'any t': ev['ce']},
         'val_mse': {str(t): ev[f'mse_t{t}'] for t in times} or {'any t': ev['mse']}}
  if 'mse_other_context' in ev:  # a chunk generator: how much its head uses context
    out.update(val_mse_own_context=ev['mse'], val_mse_other_context=ev['mse_other_context'])
  for name in ('next_chunk_ce', 'next_chunk_accuracy'):
    if name in ev:
      out[f'val_{name}'] = ev[name]
  return out


def generation_metrics(model, real_BL: np.ndarray, num_samples: int, steps: int,
                       batch_size: int, seed: int = 0, noise_scale=None
                       ) -> tuple[dict, list[str]]:
  """Statistics of `num_samples` generated windows against as many real ones."""
  for B in {min(batch_size, num_samples), num_samples % batch_size} - {0}:
    model.sample(B, steps=steps, seed=seed)  # compile every batch shape untimed
  start = time.perf_counter()
  latents, tokens = model.sample(num_samples, steps=steps, seed=seed,
                                 batch_size=batch_size, noise_scale=noise_scale)
  seconds = (time.perf_counter() - start) / num_samples
  real = real_BL[:num_samples]
  Z = latents.shape[-1]
  encode = lambda toks: batched(model.encode_tokens, toks, batch_size)
  again = encode(tokens)
  retokens = batched(model.decode_tokens, again, batch_size)
  metrics = {  # the sampled ids as they are: EOS and special tokens counted
      'gen_token_id_entropy': unigram_entropy(tokens),
      'real_token_id_entropy': unigram_entropy(real),
      'gen_distinct_2': distinct_n(tokens, 2),
      'gen_distinct_3': distinct_n(tokens, 3),
      'real_distinct_2': distinct_n(real, 2),
      'gen_repeat_4gram_rate': repeat_ngram_rate(tokens, 4),
      'real_repeat_4gram_rate': repeat_ngram_rate(real, 4),
      'gen_frechet_latent_distance': frechet_latent_distance(
          again.reshape(-1, Z), encode(real).reshape(-1, Z)),
      'gen_roundtrip_token_accuracy': float((retokens == tokens).mean()),
      'seconds_per_sample': seconds,
  }
  return metrics, [model.text(t) for t in tokens]
