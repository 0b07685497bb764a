"""Sampler settings of one trained chunk-generator run, without retraining: each arm
`steps:shift:noise_scale` (head Euler steps, the time grid's shift `flow.sample_shift`,
the starting noise's scale) sampled at several seeds, scored like `evaluate` (sample
perplexity under an `ar` run, unigram entropy, chunk validity; means over seeds).

    python benchmarks/sampler_grid.py --run runs/tiny/diffusion --reference runs/tiny/ar \\
        --arms 4:1.0:0.35,4:0.5:0.35,4:2.0:0.35

One JSON line per arm. Samples are drawn in batches of `--batch_size`, which sets
their noise: compare arms within one grid, not with `evaluate`'s numbers.
"""

from __future__ import annotations

import argparse
import json

import common  # noqa: F401  (the repository on sys.path)
import numpy as np

import tokcom_jax
from tokcom_jax.data import batches
from tokcom_jax.evaluation import quality


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--run', default='runs/tiny/diffusion')
  p.add_argument('--reference', default='runs/tiny/ar')
  p.add_argument('--arms', default='4:1.0:0.35,4:0.5:0.35,4:2.0:0.35')
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--num_samples', type=int, default=64)
  p.add_argument('--batch_size', type=int, default=64)
  args = p.parse_args()
  model, reference = tokcom_jax.load(args.run), tokcom_jax.load(args.reference)
  c = model.config
  train = batches.load_token_stream(c.data.source, 'train', model.tokenizer,
                                    c.data.cache_dir or None, c.data.text_column,
                                    c.data.train_split)
  for arm in args.arms.split(','):
    steps, shift, noise = arm.split(':')
    c.unlock()
    c.flow.sample_shift = float(shift)  # read by the sampler at each call
    c.lock()
    texts = {f'seed{s}': model.generate(args.num_samples, steps=int(steps), seed=int(s),
                                        batch_size=args.batch_size,
                                        noise_scale=float(noise))
             for s in args.seeds.split(',')}
    rows = quality.generation_quality(texts, reference, train, model.tokenizer,
                                      c.chunk_size, args.batch_size)['rows']
    mean = lambda k: float(np.mean([r[k] for r in rows.values()]))
    print(json.dumps({'run': args.run, 'steps': int(steps), 'shift': float(shift),
                      'noise_scale': float(noise), 'seeds': args.seeds,
                      'perplexity': mean('perplexity'),
                      'unigram_entropy': mean('unigram_entropy'),
                      'chunk_validity': mean('chunk_validity')}), flush=True)


if __name__ == '__main__':
  main()
