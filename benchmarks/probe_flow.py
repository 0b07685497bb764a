"""Where do samples leave the data manifold? Tracks the flow model's prediction of x1
over the Euler steps of a trained run, against real latents.

    python benchmarks/probe_flow.py --workdir runs/tiny/diffusion [--steps 50]

For every step (and one-step denoising of real latents noised to each t): the
predicted x1's per-dimension mean and std against the real latents', and the median
distance from a predicted latent to its nearest real latent (against the median
distance between real latents). All in the VAE's units. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import tokcom_jax  # noqa: E402
from tokcom_jax.data import batches
from tokcom_jax.models import flow


def nearest(a_MZ: np.ndarray, b_KZ: np.ndarray, exclude_self=False) -> np.ndarray:
  d = np.sqrt(np.maximum(
      (a_MZ ** 2).sum(1)[:, None] + (b_KZ ** 2).sum(1)[None] - 2 * a_MZ @ b_KZ.T, 0))
  if exclude_self:
    np.fill_diagonal(d, np.inf)
  return d.min(1)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', default='runs/tiny/diffusion')
  parser.add_argument('--steps', type=int, default=50)
  parser.add_argument('--num_samples', type=int, default=64)
  args = parser.parse_args()
  model = tokcom_jax.load(args.workdir)
  c = model.config
  if c.flow.order != 'parallel':
    parser.error(f'{args.workdir} generates chunk by chunk (flow.order={c.flow.order});'
                 ' this probe follows one ODE over the whole sequence: give a parallel run.')
  stream = batches.load_token_stream(c.data.source, 'validation', model.tokenizer,
                                  c.data.cache_dir or None)
  windows = batches.Windows(stream, c.max_length)
  real = windows.get(np.arange(min(256, windows.num_windows)))
  real_z = model.encode_tokens(real).reshape(-1, c.vae.latent_dim)
  base = float(np.median(nearest(real_z[:1024], real_z[:1024], exclude_self=True)))
  print(json.dumps({'real_mean_abs': float(np.abs(real_z.mean(0)).mean()),
                    'real_std': float(real_z.std(0).mean()),
                    'median_nn_real_to_real': base}))
  dit = nnx.merge(model.dit_graphdef, model.dit_params)
  predict = jax.jit(lambda x, t, prev: dit(x, t, prev))
  N, Z = c.max_length // c.chunk_size, c.vae.latent_dim
  x = flow.sample_noise(jax.random.key(0), (args.num_samples, N, Z), c.flow.noise_std)
  prev = jnp.zeros_like(x)

  def stats(z_flow, label, t):
    z = np.asarray(dit.to_latent(z_flow)).reshape(-1, Z)
    return {label: round(float(t), 4), 'pred_mean_abs_err': float(
        np.abs(z.mean(0) - real_z.mean(0)).mean()),
            'pred_std_ratio': float((z.std(0) / real_z.std(0)).mean()),
            'median_nn_to_real': float(np.median(nearest(z[:1024], real_z)))}

  for i in range(args.steps):
    t = float(flow.grid_time(i, args.steps, c.flow.sample_shift))
    t_next = float(flow.grid_time(i + 1, args.steps, c.flow.sample_shift))
    x1 = predict(x, jnp.full((args.num_samples,), t), prev)
    if i % max(args.steps // 10, 1) == 0 or i == args.steps - 1:
      print(json.dumps(stats(x1, 'step_t', t)))
    r = (t_next - t) / (1 - t)
    x, prev = (1 - r) * x + r * x1, x1
  # One-step denoising of real latents from each noise level.
  x1_real = dit.to_flow(jnp.asarray(real_z.reshape(-1, N, Z)[:args.num_samples]))
  for t in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9):
    x0 = flow.sample_noise(jax.random.key(1), x1_real.shape, c.flow.noise_std)
    xt = flow.interpolate(x0, x1_real, jnp.full((x1_real.shape[0],), t))
    pred = predict(xt, jnp.full((x1_real.shape[0],), t), jnp.zeros_like(xt))
    tokens = model.decode_tokens(np.asarray(dit.to_latent(pred)))
    row = stats(pred, 'denoise_from_t', t)
    row['token_accuracy'] = float((tokens == real[:args.num_samples]).mean())
    print(json.dumps(row))


if __name__ == '__main__':
  main()
