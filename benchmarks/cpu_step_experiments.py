"""Variants of the VAE train step on a CPU, timed in one process, interleaved.

    python benchmarks/cpu_step_experiments.py --config bench --rounds 3

Each variant changes one thing in how the step is computed (not what it computes);
all are compiled first, then timed round-robin (`--steps` steps per variant per
round) so that a machine whose speed drifts treats them alike; PyTorch's step of
the same model is timed in the same rounds. XLA flags apply per process: run the
script again with XLA_FLAGS set to compare them. One JSON line per variant: the
median and the best round's ms per step, and tokens/s against PyTorch's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics

import common
import jax
import jax.numpy as jnp
import optax

import train_step
from tokcom_jax.models import flops, layers, vae


def autodiff_swiglu(self, x):
  """The SwiGLU MLP as it was before `ops.swiglu`: jax.grad of the plain layers."""
  return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def fused_qkv(self, x_BTD, positions_T):
  """q, k and v from one [D, (N + 2K)·H] matmul, the kernels concatenated per call."""
  D = x_BTD.shape[-1]
  mods = (self.query, self.key, self.value)
  heads = [m.kernel.shape[1] for m in mods]
  dtype = self.cfg.dtype
  w = jnp.concatenate([m.kernel[...].reshape(D, -1) for m in mods], 1).astype(dtype)
  b = jnp.concatenate([m.bias[...].reshape(-1) for m in mods]).astype(dtype)
  y = x_BTD.astype(dtype) @ w + b
  H = self.cfg.head_dim
  q, k, v = jnp.split(y, [heads[0] * H, (heads[0] + heads[1]) * H], axis=-1)
  split = lambda a, n: a.reshape(*a.shape[:-1], n, H)
  theta = self.cfg.rope_theta
  return (layers.apply_rope(split(q, heads[0]), positions_T, theta),
          layers.apply_rope(split(k, heads[1]), positions_T, theta), split(v, heads[2]))


def one_hot_ce(logits, labels):
  return optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))


@contextlib.contextmanager
def patched(obj, name, value):
  old = getattr(obj, name)
  setattr(obj, name, value)
  try:
    yield
  finally:
    setattr(obj, name, old)


VARIANTS = {
    'current': contextlib.nullcontext,
    'autodiff_swiglu': lambda: patched(layers.SwiGLU, '__call__', autodiff_swiglu),
    'fused_qkv': lambda: patched(layers.Attention, 'qkv', fused_qkv),
    'ce_one_hot': lambda: patched(
        vae.optax, 'softmax_cross_entropy_with_integer_labels', one_hot_ce),
}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', default='bench')
  p.add_argument('--variants', default=','.join(VARIANTS))
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--set', default='')
  args = p.parse_args()
  config = common.get_config(args.config, ','.join(filter(None, ['vae', args.set])),
                             'float32')
  tokens = flops.tokens_per_step(config)
  steps = {}
  for name in args.variants.split(','):
    with VARIANTS[name]():  # traced and compiled under the change
      steps[name] = train_step.build_step(config, 'vae')
      steps[name]()
  torch_round = lambda: train_step.torch_vae_step(config, args.steps, 1, 'float32')[0]
  times = {name: [] for name in [*steps, 'torch']}
  for _ in range(args.rounds):
    for name, one in steps.items():
      times[name].append(common.timed(one, args.steps))
    times['torch'].append(torch_round())
  torch_s = statistics.median(times['torch'])
  for name, ts in times.items():
    common.emit({'bench': 'cpu_step_experiment', 'config': args.config,
                 'variant': name, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
                 'median_ms': 1e3 * statistics.median(ts), 'best_ms': 1e3 * min(ts),
                 'tokens_per_sec': tokens / statistics.median(ts),
                 'over_torch': torch_s / statistics.median(ts),
                 'device': common.device_name()})


if __name__ == '__main__':
  main()
