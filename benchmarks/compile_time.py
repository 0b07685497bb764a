"""Compile time of one train step against depth, with and without `scan_layers`.

    python benchmarks/compile_time.py                       # v5.2 shapes, 12/24/48
    python benchmarks/compile_time.py --config tiny --layers 2,4 --stages vae

Ahead of time, on abstract arrays (nothing allocated, nothing run): the train step
of each stage (forward, backward, AdamW) is lowered and compiled for batch 1 at the
config's shapes with `layers` transformer blocks per stack: the VAE's encoder and
decoder `layers` each, the flow model `layers` (its frozen VAE kept at the config's
depth). One JSON line per (stage, layers, scan): seconds to lower, to compile, and
the size of the optimised HLO.
"""

from __future__ import annotations

import argparse
import json
import time

import common
import jax
import numpy as np

from tokcom_jax import stages
from tokcom_jax.training import sharding, steps, train_state


def layer_fields(stage: str, layers: int) -> str:
  if stage == 'vae':
    return f'vae.encoder_layers={layers},vae.decoder_layers={layers}'
  return f'dit.num_layers={layers}'


def compile_step(config) -> dict:
  """Seconds to lower and to compile the train step of `config.stage`, batch 1."""
  mesh = sharding.make_mesh(1, 1)
  stage = stages.get(config)
  frozen = stage.frozen()
  optimizer, _ = train_state.make_optimizer(config.train, 1e-4, 1000)
  graphdef, state = train_state.abstract_state(stage.build, mesh, optimizer)
  frozen_params = train_state.abstract_frozen(frozen, mesh)
  step = steps.make_train_step(
      stage, graphdef, train_state.frozen_graphdefs(frozen), optimizer,
      steps.shardings_of(state), steps.shardings_of(frozen_params), mesh)
  tokens = jax.ShapeDtypeStruct((1, config.max_length), np.int32,
                                sharding=sharding.batch_sharding(mesh))
  key = jax.eval_shape(lambda: jax.random.key(0))
  start = time.perf_counter()
  lowered = step.lower(state, tokens, key, frozen_params)
  lowered_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  return {'lower_s': lowered_s, 'compile_s': compile_s,
          'hlo_chars': len(compiled.as_text())}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='v52', help='tiny, bench or v52')
  parser.add_argument('--stages', default='vae,diffusion')
  parser.add_argument('--layers', default='12,24,48')
  parser.add_argument('--dtype', default='bfloat16')
  args = parser.parse_args()
  for stage in args.stages.split(','):
    for layers in map(int, args.layers.split(',')):
      for scan in (False, True):
        config = common.get_config(
            args.config, f'{stage},{layer_fields(stage, layers)},'
            f'scan_layers={scan}', args.dtype, batch_size=1)
        row = {'bench': 'compile_time', 'config': args.config, 'stage': stage,
               'layers': layers, 'scan_layers': scan, 'dtype': args.dtype,
               **compile_step(config), 'device': common.device_name()}
        print(json.dumps(row), flush=True)


if __name__ == '__main__':
  main()
