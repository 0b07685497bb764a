"""The axis names that model code and the mesh share.

Parameters carry logical axis names (`partitioned`); `tokcom_jax.training.sharding`
maps them onto the mesh axes `MESH_AXES`. Activations stay split over `BATCH_AXES`
(`constrain_batch`). Model code needs these names without knowing any mesh, so they
live here, below both.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

Array = jax.Array

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')  # the mesh axes a batch is split over


def constrain_batch(x: Array) -> Array:
  """Keeps an activation split over the batch axes of the current mesh.

  Without it XLA may split FSDP activations along their width to match the
  parameters' sharding, and replicate others to get there. A no-op unless a mesh
  with the batch axes is set (`jax.sharding.use_abstract_mesh`) and divides the batch.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  if x.shape[0] % math.prod(mesh.shape[a] for a in BATCH_AXES):
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(BATCH_AXES))


def partitioned(init, *names: str | None):
  """An initializer whose parameter carries the logical axis `names`."""
  return nnx.with_partitioning(init, names, eager_sharding=False)
