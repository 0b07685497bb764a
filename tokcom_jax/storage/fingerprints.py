"""Fingerprints of a checkpoint's parts: `meta` holds a checksum of every part of
the state, written with it, and a restore checks what it read against them, so
that damage after writing (a truncated file, a flipped bit) is caught."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tokcom_jax.errors import CheckpointError


@jax.jit
def fingerprint(tree) -> jax.Array:
  """A uint32 checksum of a tree's bits. Each element's bits are weighted by an odd
  number that depends on its position, so any single flipped bit changes it."""
  total = jnp.zeros((), jnp.uint32)
  for i, x in enumerate(jax.tree.leaves(tree)):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 4:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 2:
      bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    else:
      bits = x.astype(jnp.uint32)
    position = jax.lax.broadcasted_iota(jnp.uint32, x.shape, 0) if x.ndim else 0
    for d in range(1, x.ndim):  # row-major element index
      position = position * jnp.uint32(x.shape[d]) + jax.lax.broadcasted_iota(
          jnp.uint32, x.shape, d)
    total += jnp.uint32(2 * i + 1) * jnp.sum(bits * (2 * position + 1),
                                             dtype=jnp.uint32)
  return total


def of(state) -> dict[str, int]:
  return {k: int(v) for k, v in jax.device_get(
      {k: fingerprint(v) for k, v in state.items()}).items()}


def check(state, meta: dict, step: int) -> None:
  expected = meta.get('fingerprints', {})
  for name, value in of(state).items():
    if name in expected and expected[name] != value:
      raise CheckpointError(f'the {name} read back from step {step} do not match'
                            ' the fingerprint written with them')
