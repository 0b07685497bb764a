"""One mesh for every run, logical axis rules, and multi-host start-up.

The mesh has two axes: `data` (pure data parallelism) and `fsdp` (data parallelism
whose parameters and optimizer state are sharded too). The batch is split over both;
parameters are split over `fsdp` along their `embed` axis. A single CPU is a 1×1 mesh.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tokcom_jax import layers

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = layers.BATCH_AXES  # ('data', 'fsdp')

# Logical parameter axis → mesh axis. FSDP shards the width (`embed`) of every
# matrix; everything else is replicated. A `tensor` axis would map heads/mlp here.
LOGICAL_RULES = (
    ('embed', 'fsdp'),
    ('vocab', None), ('mlp', None), ('heads', None), ('kv_heads', None),
    ('head_dim', None), ('latent', None), ('modulation', None), ('freq', None),
    ('embed_out', None),
)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts JAX's multi-process runtime when there is more than one process.

  On a TPU VM pod every argument is discovered, so none is needed; elsewhere pass
  the coordinator's host:port, the number of processes and this process's id.
  """
  if coordinator_address:
    # CPU processes need a collectives backend of their own (GPUs and TPUs have one).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif _on_tpu_pod():
    jax.distributed.initialize()


def _on_tpu_pod() -> bool:
  return bool(os.environ.get('TPU_WORKER_HOSTNAMES', '').count(','))


def make_mesh(data: int = -1, fsdp: int = 1) -> jax.sharding.Mesh:
  """A (data, fsdp) mesh over all devices; -1 on one axis means "the rest"."""
  n = jax.device_count()
  if data == -1 and fsdp == -1:
    raise ValueError('mesh: at most one of data and fsdp may be -1.')
  if data == -1:
    data = n // fsdp
  if fsdp == -1:
    fsdp = n // data
  if data * fsdp != n:
    raise ValueError(f'mesh {data}x{fsdp} (data x fsdp) does not use the {n} devices'
                     f' there are: set config.mesh.data and config.mesh.fsdp so that'
                     f' their product is {n}.')
  return jax.make_mesh((data, fsdp), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def under_mesh(fn, mesh):
  """fn, traced with `mesh` as the abstract mesh, so that the model's activation
  constraints (`layers.constrain_batch`) apply."""
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return wrapped


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fit(spec: P, shape, mesh) -> P:
  """Drops a mesh axis from any dimension it does not divide (that dim replicates)."""
  out = []
  for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axis,) if isinstance(axis, str) else (axis or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    out.append(axis if size > 1 and dim % size == 0 else None)
  return P(*out)


def param_shardings(abstract_state, mesh, rules=LOGICAL_RULES):
  """NamedShardings for a tree of nnx Variables with logical axis metadata."""
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(abstract_state)
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)),
      specs, abstract_state,
      is_leaf=lambda x: isinstance(x, P))


def process_rows(global_batch: int, mesh) -> slice:
  """The rows of a global batch whose data lives on this process's devices."""
  sharding = batch_sharding(mesh)
  index_map = sharding.addressable_devices_indices_map((global_batch,))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [global_batch if idx[0].stop is None else idx[0].stop
           for idx in index_map.values()]
  return slice(min(starts), max(stops))


def global_batch(local: np.ndarray, mesh, global_batch_size: int) -> jax.Array:
  """This process's rows → one global array sharded over the batch axes."""
  return jax.make_array_from_process_local_data(
      batch_sharding(mesh), local, (global_batch_size,) + local.shape[1:])


def log_mesh(mesh) -> None:
  logging.info('mesh %s over %d devices (%d processes)', dict(mesh.shape),
               jax.device_count(), jax.process_count())


# ------------------------------------------------- memory report (python -m …)


def memory_report(config, mesh_shapes, compile: bool = True) -> list[dict]:
  """Per-device bytes of a stage's train state under each (data, fsdp) mesh shape,
  and the compiler's memory analysis of its train step (ahead of time: nothing of
  full size is allocated, no step runs)."""
  from tokcom_jax import train_lib  # the train step lives there
  rows = []
  for data, fsdp in mesh_shapes:
    devices = np.array(jax.devices()[:data * fsdp]).reshape(data, fsdp)
    mesh = jax.sharding.Mesh(devices, MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
    optimizer, _ = train_lib.make_optimizer(config, config.stage, 1000)
    graphdef, state = train_lib.abstract_state(config, config.stage, mesh, optimizer)
    row = {'stage': config.stage, 'mesh': f'{data}x{fsdp}',
           'params_bytes': train_lib.per_device_bytes(state['params']),
           'optimizer_bytes': train_lib.per_device_bytes(state['opt_state'])}
    frozen, frozen_abstract = (), ()
    if config.stage == 'diffusion':
      vae_graphdef, vae_params = train_lib.abstract_params(config, 'vae', mesh)
      frozen_abstract = (vae_params,)
      frozen = (jax.tree.map(lambda x: x.sharding, vae_params),)
      row['frozen_vae_bytes'] = train_lib.per_device_bytes(vae_params)
    if compile:
      loss = train_lib.stage_loss(config, config.stage, graphdef,
                                  vae_graphdef if frozen else None)
      step = train_lib.make_train_step(
          loss, optimizer, jax.tree.map(lambda x: x.sharding, state), mesh, frozen)
      tokens = jax.ShapeDtypeStruct((config.train.batch_size, config.max_length),
                                    np.int32, sharding=batch_sharding(mesh))
      key = jax.eval_shape(lambda: jax.random.key(0))
      stats = step.lower(state, tokens, key, *frozen_abstract).compile(
          ).memory_analysis()
      if stats is not None:
        row.update(argument_bytes=stats.argument_size_in_bytes,
                   output_bytes=stats.output_size_in_bytes,
                   temp_bytes=stats.temp_size_in_bytes,
                   alias_bytes=stats.alias_size_in_bytes)
    rows.append(row)
  return rows


def parse_mesh_shapes(specs: list[str]) -> list[tuple[int, int]]:
  """['2x4', '8x1'] → [(2, 4), (8, 1)] (data x fsdp)."""
  from tokcom_jax.config_lib import ConfigError
  shapes = []
  for spec in specs:
    parts = spec.lower().split('x')
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
      raise ConfigError(f'--mesh {spec!r}: write DATAxFSDP, e.g. 2x4.')
    shapes.append((int(parts[0]), int(parts[1])))
  return shapes


if __name__ == '__main__':
  import json

  from absl import flags
  from ml_collections import config_flags

  from tokcom_jax import cli
  config_flags.DEFINE_config_file('config', None, 'e.g. configs/v52.py:vae')
  flags.DEFINE_list('mesh', ['8x1', '1x8', '2x4'], 'data x fsdp mesh shapes.')
  flags.DEFINE_bool('no_compile', False, 'Only the state bytes, no compiled step.')
  flags.mark_flag_as_required('config')

  def main(argv):
    del argv
    F = flags.FLAGS
    shapes = parse_mesh_shapes(F.mesh)
    need = max(d * f for d, f in shapes)
    # Unless JAX_PLATFORMS says otherwise, fake as many CPU devices as the largest
    # mesh needs; this must happen before JAX starts its backend.
    if os.environ.get('JAX_PLATFORMS', 'cpu') == 'cpu':
      jax.config.update('jax_platforms', 'cpu')
      jax.config.update('jax_num_cpu_devices', need)
    if need > jax.device_count():
      from tokcom_jax.config_lib import ConfigError
      raise ConfigError(f'--mesh {",".join(F.mesh)} needs {need} devices; there are'
                        f' {jax.device_count()}.')
    for row in memory_report(F.config, shapes, compile=not F.no_compile):
      print(json.dumps(row), flush=True)
  cli.run(main)
