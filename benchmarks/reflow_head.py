"""Reflow of a trained chunk generator's flow head, measured at few sampling steps:
the head, warm-started from the run's, learns the straight path from each starting
noise x0 to where the run's own head takes it in `--teacher_steps` Euler steps
(Liu et al. 2022, "Flow Straight and Fast"), on the trunk states of training
windows; the trunk and the VAE stay frozen. Then both heads are sampled at each of
`--steps` and scored like `evaluate` (perplexity under an `ar` run, unigram entropy,
chunk validity; means over seeds).

    python benchmarks/reflow_head.py --run runs/tiny/diffusion --reference runs/tiny/ar \\
        --train_steps 1000 --steps 1,2,4,8

One JSON line per (head, steps).
"""

from __future__ import annotations

import argparse
import json
import time

import common  # noqa: F401  (the repository on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import tokcom_jax
from tokcom_jax.data import batches
from tokcom_jax.evaluation import quality
from tokcom_jax.models import flow, samplers


def reflow_loss(head, teacher, h_MD, x0_MZ, teacher_steps, t_M):
  """The student head's MSE to the teacher head's `teacher_steps`-step endpoint
  from x0, at x_t on the straight line between them."""
  x1_MZ = jax.lax.stop_gradient(samplers.head_latents(
      teacher, h_MD, x0_MZ, teacher_steps, jax.random.key(0)))
  x_t_MZ = flow.interpolate(x0_MZ, x1_MZ, t_M)
  pred_MZ = head.x1(x_t_MZ, t_M, h_MD)
  return jnp.mean(jnp.square(pred_MZ - x1_MZ))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--run', default='runs/tiny/diffusion')
  p.add_argument('--reference', default='runs/tiny/ar')
  p.add_argument('--train_steps', type=int, default=1000)
  p.add_argument('--teacher_steps', type=int, default=16)
  p.add_argument('--lr', type=float, default=3e-4)
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--batch_mul', type=int, default=4)
  p.add_argument('--noise_scale', type=float, default=None)
  p.add_argument('--t_grid', default='0,0.25,0.3333,0.5,0.6667,0.75',
                 help="times the student trains at ('uniform': U[0, 1))")
  p.add_argument('--steps', default='1,2,4,8')
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--num_samples', type=int, default=64)
  p.add_argument('--skip_teacher', action='store_true')
  args = p.parse_args()
  model, reference = tokcom_jax.load(args.run), tokcom_jax.load(args.reference)
  c = model.config
  noise_scale = args.noise_scale or c.sample.noise_scale
  std = c.flow.noise_std * noise_scale
  train, _ = batches.load_splits(c, model.tokenizer, args.batch_size)
  teacher = nnx.merge(model.dit_graphdef, model.dit_params)
  vae = nnx.merge(model.vae_graphdef, model.vae_params)
  student = nnx.merge(model.dit_graphdef, model.dit_params)
  head_graphdef, head_state = nnx.split(student.head)
  optimizer = optax.adam(optax.cosine_decay_schedule(args.lr, args.train_steps, 0.1))
  opt_state = optimizer.init(head_state)
  grid = (None if args.t_grid == 'uniform'
          else jnp.asarray([float(t) for t in args.t_grid.split(',')]))

  @jax.jit
  def train_step(head_state, opt_state, tokens_BL, key):
    x1_BNZ = teacher.to_flow(vae.encode(tokens_BL)[0])
    B, N, Z = x1_BNZ.shape
    h_MD = jnp.repeat(teacher.states(tokens_BL, x1_BNZ).reshape(B * N, -1),
                      args.batch_mul, axis=0)
    M = h_MD.shape[0]
    k0, k1 = jax.random.split(key)
    x0_MZ = flow.sample_noise(k0, (M, Z), std)
    t_M = (jax.random.uniform(k1, (M,)) if grid is None
           else grid[jax.random.randint(k1, (M,), 0, grid.shape[0])])

    def loss(state):
      return reflow_loss(nnx.merge(head_graphdef, state), teacher, h_MD, x0_MZ,
                         args.teacher_steps, t_M)
    value, grads = jax.value_and_grad(loss)(head_state)
    updates, opt_state = optimizer.update(grads, opt_state, head_state)
    return optax.apply_updates(head_state, updates), opt_state, value

  start = time.time()
  for step in range(args.train_steps):
    tokens = train.get(batches.train_indices(step, 7, train.num_windows, args.batch_size))
    head_state, opt_state, value = train_step(head_state, opt_state, tokens,
                                              jax.random.key(step))
    if step % 100 == 0 or step == args.train_steps - 1:
      print(json.dumps({'step': step, 'reflow_mse': float(value),
                        'seconds': round(time.time() - start, 1)}), flush=True)
  nnx.update(student.head, head_state)
  heads = {'reflow': nnx.state(student)}
  if not args.skip_teacher:
    heads = {'teacher': model.dit_params, **heads}
  for name, params in heads.items():
    model.dit_params = params
    for steps in (int(s) for s in args.steps.split(',')):
      texts = {f'seed{s}': model.generate(args.num_samples, steps=steps, seed=int(s),
                                          batch_size=args.num_samples,
                                          noise_scale=noise_scale)
               for s in args.seeds.split(',')}
      rows = quality.generation_quality(texts, reference, train.stream, model.tokenizer,
                                        c.chunk_size, args.num_samples)['rows']
      mean = lambda k: float(np.mean([r[k] for r in rows.values()]))
      print(json.dumps({'head': name, 'steps': steps, 'seeds': args.seeds,
                        'perplexity': round(mean('perplexity'), 1),
                        'unigram_entropy': round(mean('unigram_entropy'), 3),
                        'chunk_validity': round(mean('chunk_validity'), 3)}), flush=True)
  print(model.generate(2, steps=min(int(s) for s in args.steps.split(',')), seed=0,
                       noise_scale=noise_scale))


if __name__ == '__main__':
  main()
