"""Per-device memory of a stage's training under several mesh shapes, ahead of time.

    python -m tokcom_jax.memory --config configs/v52.py:diffusion --mesh 8x1,1x8,2x4

Prints one JSON object per mesh shape (data x fsdp): the bytes one device holds of
the parameters, the AdamW state and any frozen model, and the compiler's memory
analysis of the train step. Nothing of full size is allocated and no step runs; on
a CPU, as many devices as the largest mesh needs are faked.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from tokcom_jax import stages
from tokcom_jax.errors import ConfigError
from tokcom_jax.training import sharding, steps, train_state


def memory_report(config, mesh_shapes, compile: bool = True) -> list[dict]:
  """One row per (data, fsdp) mesh shape, for `config.stage`."""
  stage = stages.get(config)
  frozen = stage.frozen()
  rows = []
  for data, fsdp in mesh_shapes:
    devices = np.array(jax.devices()[:data * fsdp]).reshape(data, fsdp)
    mesh = jax.sharding.Mesh(devices, sharding.MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
    optimizer, _ = train_state.make_optimizer(config.train, 1e-4, 1000)
    graphdef, state = train_state.abstract_state(stage.build, mesh, optimizer)
    frozen_params = train_state.abstract_frozen(frozen, mesh)
    row = {'stage': stage.name, 'mesh': f'{data}x{fsdp}',
           'params_bytes': train_state.per_device_bytes(state['params']),
           'optimizer_bytes': train_state.per_device_bytes(state['opt_state'])}
    for name, params in frozen_params.items():
      row[f'frozen_{name}_bytes'] = train_state.per_device_bytes(params)
    if compile:
      step = steps.make_train_step(
          stage, graphdef, train_state.frozen_graphdefs(frozen), optimizer,
          steps.shardings_of(state), steps.shardings_of(frozen_params), mesh)
      tokens = jax.ShapeDtypeStruct((config.train.batch_size, config.max_length),
                                    np.int32, sharding=sharding.batch_sharding(mesh))
      key = jax.eval_shape(lambda: jax.random.key(0))
      stats = step.lower(state, tokens, key, frozen_params).compile().memory_analysis()
      if stats is not None:
        row.update(argument_bytes=stats.argument_size_in_bytes,
                   output_bytes=stats.output_size_in_bytes,
                   temp_bytes=stats.temp_size_in_bytes,
                   alias_bytes=stats.alias_size_in_bytes)
    rows.append(row)
  return rows


def parse_mesh_shapes(specs: list[str]) -> list[tuple[int, int]]:
  """['2x4', '8x1'] → [(2, 4), (8, 1)] (data x fsdp)."""
  shapes = []
  for spec in specs:
    parts = spec.lower().split('x')
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
      raise ConfigError(f'--mesh {spec!r}: write DATAxFSDP, e.g. 2x4.')
    shapes.append((int(parts[0]), int(parts[1])))
  return shapes


def main(argv):
  del argv
  from absl import flags
  from tokcom_jax import config_checks
  F = flags.FLAGS
  config_checks.check_config(F.config)  # --config.field=value flags apply after it
  shapes = parse_mesh_shapes(F.mesh)
  need = max(d * f for d, f in shapes)
  # Unless JAX_PLATFORMS says otherwise, fake as many CPU devices as the largest mesh
  # needs; this must happen before JAX starts its backend.
  if os.environ.get('JAX_PLATFORMS', 'cpu') == 'cpu':
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', need)
  if need > jax.device_count():
    raise ConfigError(f'--mesh {",".join(F.mesh)} needs {need} devices; there are'
                      f' {jax.device_count()}.')
  for row in memory_report(F.config, shapes, compile=not F.no_compile):
    print(json.dumps(row), flush=True)


if __name__ == '__main__':
  from absl import flags
  from ml_collections import config_flags

  from tokcom_jax import cli
  config_flags.DEFINE_config_file('config', None, 'e.g. configs/v52.py:vae')
  flags.DEFINE_list('mesh', ['8x1', '1x8', '2x4'], 'data x fsdp mesh shapes.')
  flags.DEFINE_bool('no_compile', False, 'Only the state bytes, no compiled step.')
  flags.mark_flag_as_required('config')
  cli.run(main)
