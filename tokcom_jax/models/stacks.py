"""Stacks of identical blocks: made, run, and converted between two layouts.

With `scan_layers` the L blocks of a stack are one module whose parameters carry a
leading `layers` axis [L, ...], and the forward pass is one `jax.lax.scan` over it,
so the compiled program (and its compile time) does not grow with depth; without,
they are an `nnx.List` run by a Python loop. `remat` recomputes each block's
activations in the backward pass instead of storing them: 'none', 'dots_saveable'
(keep matmul outputs, recompute the elementwise work) or 'full' (keep only each
block's input).

A parameter tree (a pure dict) of a looped stack has `blocks` {0: ..., 1: ...}; of a
scanned one, `blocks` with every leaf stacked [L, ...]. `stack_layers`,
`unstack_layers` and `as_saved` convert one into the other, for arrays and for
abstract ShapeDtypeStructs with shardings, so that a run saved with one
`scan_layers` restores into a model built with the other.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P


REMAT_POLICIES = ('none', 'dots_saveable', 'full')


def make_blocks(make_block, cfg, rngs: nnx.Rngs):
  """`cfg.num_layers` (a `layers.TransformerConfig`) blocks `make_block(rngs)`: one
  module with every parameter stacked on a leading `layers` axis
  (`cfg.scan_layers`), else an `nnx.List`."""
  if not cfg.scan_layers:
    return nnx.List([make_block(rngs) for _ in range(cfg.num_layers)])

  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0,
            transform_metadata={nnx.PARTITION_NAME: 'layers'})
  def stacked(rngs):
    return make_block(rngs)
  return stacked(rngs)


def apply_blocks(blocks, cfg, layer_fn, carry, xs=None):
  """Runs `carry` through the blocks in order, `carry, y = layer_fn(block, carry, x)`
  with x the block's own entry of `xs` (None: nothing per block). Returns (carry,
  ys); `xs` and `ys` are stacked on a leading layer axis with `cfg.scan_layers`,
  lists without. Each block's activations are rematerialised per `cfg.remat`."""

  def pure(graphdef, state, carry, x):
    return layer_fn(nnx.merge(graphdef, state), carry, x)

  if cfg.remat != 'none':
    policy = (jax.checkpoint_policies.dots_saveable if cfg.remat == 'dots_saveable'
              else None)  # None: save nothing but the block's inputs
    pure = jax.checkpoint(pure, policy=policy, static_argnums=(0,),
                          prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    graphdef, state = nnx.split(blocks)
    return jax.lax.scan(lambda c, layer: pure(graphdef, layer[0], c, layer[1]),
                        carry, (state, xs))
  ys = []
  for i, block in enumerate(blocks):
    carry, y = pure(*nnx.split(block), carry, None if xs is None else xs[i])
    ys.append(y)
  return carry, ys


def as_loop(model):
  """`model` (any module built as `type(model)(cfg, rngs=…)` whose cfg has
  `scan_layers`) with its stacks as loops, the per-layer weights sliced from the
  stacks once. For programs that run the model many times in a loop (decoding,
  Euler steps): a scan inside the loop would slice every layer's weights again at
  every step (the ar stage decoded 2.2× slower at the tiny size)."""
  if not model.cfg.scan_layers:
    return model
  cfg = dataclasses.replace(model.cfg, scan_layers=False)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: type(model)(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, unstack_layers(nnx.to_pure_dict(nnx.state(model))))


def _is_loop(value) -> bool:
  return isinstance(value, dict) and bool(value) and all(str(k).isdigit() for k in value)


def _is_stack(key, value) -> bool:
  return key == 'blocks' and isinstance(value, dict) and not _is_loop(value)


def is_stacked(names: list[str]) -> bool:
  """Whether the parameter at this path (its keys as strings) lies in a scanned
  stack, i.e. has a leading `layers` axis: `blocks` followed by a name, not an index."""
  return any(a == 'blocks' and not b.isdigit() for a, b in zip(names, names[1:]))


def stack_layers(tree, stack=lambda xs: jnp.stack(xs)):
  """A pure dict of parameters with looped stacks in the scanned layout: every
  `blocks` {0: p0, 1: p1, ...} becomes `blocks` stack(p0, p1, ...) leaf by leaf."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for key, value in tree.items():
    if key == 'blocks' and _is_loop(value):
      per_layer = [stack_layers(value[k], stack) for k in sorted(value, key=int)]
      out[key] = jax.tree.map(lambda *xs: stack(xs), *per_layer)
    else:
      out[key] = stack_layers(value, stack)
  return out


def unstack_layers(tree, take=lambda x, i: x[i]):
  """The inverse of `stack_layers`: every scanned `blocks` [L, ...] becomes
  {0: take(·, 0), ..., L-1: take(·, L-1)}."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for key, value in tree.items():
    if _is_stack(key, value):
      L = jax.tree.leaves(value)[0].shape[0]
      out[key] = {i: jax.tree.map(lambda x, i=i: take(x, i), value) for i in range(L)}
    else:
      out[key] = unstack_layers(value, take)
  return out


def _abstract(shape, like, spec) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, like.dtype,
                              sharding=NamedSharding(like.sharding.mesh, P(*spec)))


def key_name(key) -> str:
  """One step of a pytree path as text: a dict key, a list index or an attribute."""
  return str(getattr(key, 'key', getattr(key, 'idx', getattr(key, 'name', key))))


def _paths(tree) -> set[str]:
  return {'/'.join(map(key_name, path)) for path, _ in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def as_saved(abstract, saved_tree):
  """(`abstract` params in the layout of `saved_tree` (a checkpoint's metadata of
  the same model), a function taking restored params back to `abstract`'s layout
  and shardings). The layout of `abstract` itself when neither matches."""
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  # Under jit: the restored arrays may span hosts (no eager op on them would run).
  back = lambda convert: jax.jit(convert, out_shardings=shardings)
  candidates = (
      (abstract, lambda params: params),
      (unstack_layers(abstract, lambda x, i: _abstract(
          x.shape[1:], x, tuple(x.sharding.spec)[1:])), back(stack_layers)),
      (stack_layers(abstract, lambda xs: _abstract(
          (len(xs), *xs[0].shape), xs[0], (None, *xs[0].sharding.spec))),
       back(unstack_layers)))
  saved = _paths(saved_tree)
  for candidate, convert in candidates:
    if _paths(candidate) == saved:
      return candidate, convert
  return candidates[0]
