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

from tokcom_jax import config_checks
from tokcom_jax.errors import ConfigError
from tokcom_jax.models.axes import BATCH_AXES, MESH_AXES


# Logical parameter axis → mesh axis. FSDP shards the width (`embed`) of every
# matrix; everything else is replicated. A `tensor` axis would map heads/mlp here.
LOGICAL_RULES = (
    ('embed', 'fsdp'),
    ('vocab', None), ('mlp', None), ('heads', None), ('kv_heads', None),
    ('head_dim', None), ('latent', None), ('modulation', None), ('freq', None),
    ('embed_out', None), ('layers', None),
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
  shape = mesh_shape(data, fsdp, jax.device_count())
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def cpu_only_warning(config, backend: str | None = None) -> str | None:
  """One line when `config` is made for an accelerator (bfloat16 compute, or a mesh
  of more than one device) and JAX found only the CPU (a CPU-only `jax` install,
  typically); None otherwise."""
  backend = backend or jax.default_backend()
  asks = [f'compute_dtype={config.compute_dtype}'] if config.compute_dtype == 'bfloat16' else []
  asks += [f'mesh.{axis}={config.mesh[axis]}' for axis in ('data', 'fsdp')
           if config.mesh[axis] > 1]
  if backend != 'cpu' or not asks:
    return None
  return (f'this config asks for an accelerator ({", ".join(asks)}) but JAX found only'
          ' the CPU: on a GPU install `pip install -e .[cuda12]`, on a TPU VM'
          ' `pip install -e .[tpu]`; on a CPU use configs/tiny.py.')


def under_mesh(fn, mesh):
  """fn, traced with `mesh` as the abstract mesh, so that the model's activation
  constraints (`axes.constrain_batch`) apply."""
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


def check_batch(global_batch_size: int, mesh) -> None:
  """A global batch must split evenly over the devices of the batch axes."""
  n = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  if global_batch_size % n:
    raise ConfigError(f'batch_size {global_batch_size} is not divisible by the {n}'
                      ' devices the batch is split over: set --config.train.batch_size'
                      f' to a multiple of {n}.')


def log_mesh(mesh) -> None:
  logging.info('mesh %s over %d devices (%d processes)', dict(mesh.shape),
               jax.device_count(), jax.process_count())


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) of config.mesh on `num_devices` devices; -1 is "the rest"."""
  def fail(name, value, fix):
    raise ConfigError(f'mesh.{name}={value}: mesh {data}x{fsdp} (data x fsdp) does not'
                      f' fit the {num_devices} devices there are (set --config.{fix})')
  config_checks.check_mesh_axes(data, fsdp)
  for name, size, fix in (('data', data, 'mesh.data=-1'), ('fsdp', fsdp, 'mesh.fsdp=1')):
    if size != -1 and (size < 1 or num_devices % size):
      fail(name, size, fix)
  resolved = (num_devices // fsdp if data == -1 else data,
              num_devices // data if fsdp == -1 else fsdp)
  if resolved[0] * resolved[1] != num_devices:
    fail('data', data, f'mesh.data={num_devices // resolved[1]}')
  return resolved
