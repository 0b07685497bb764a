"""The train state of any stage: parameters, optimizer, shardings, frozen inputs.

The state is a plain dict {step, params, opt_state} of global arrays, placed by
`jax.jit(init, out_shardings=…)` straight into its shardings. Everything here takes
a `build(rngs) -> nnx.Module` function and knows nothing of what it builds.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tokcom_jax.errors import TrainingError
from tokcom_jax.models import stacks
from tokcom_jax.stages.base import Build, FrozenModel
from tokcom_jax.storage import checkpoint
from tokcom_jax.training import sharding


def abstract_params(build: Build, mesh):
  """(graphdef, params as ShapeDtypeStructs with their shardings): nothing allocated."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))))
  shardings = nnx.to_pure_dict(sharding.param_shardings(abstract, mesh))
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nnx.to_pure_dict(abstract), shardings)
  return graphdef, abstract


def make_optimizer(train_config, lr: float, total_steps: int, trainable=None):
  """(optimizer, learning-rate schedule): AdamW, linear warm-up then cosine decay to
  10%, global-norm clipping, gradient accumulation over `grad_accum` batches. A
  gradient with a NaN or inf is skipped (no update, no accumulation) by
  `optax.apply_if_finite`; the loop stops the run after `max_nan_steps` in a row.
  `trainable(path)`: which parameters it updates (default: all)."""
  tc = train_config
  updates = max(total_steps // tc.grad_accum, 1)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, min(tc.warmup_steps, updates - 1) if updates > 1 else 0, updates,
      end_value=0.1 * lr)
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(decays, params)
  tx = optax.chain(
      optax.clip_by_global_norm(tc.grad_clip),
      optax.adamw(schedule, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay,
                  mask=decay_mask))
  # `trainable(path)` False: the update is zeroed after AdamW (no step, no decay).
  # Not `optax.multi_transform`: its states hold partial parameter trees, which
  # `opt_state_shardings` (optax.tree_map_params) cannot map onto the parameters.
  if trainable is not None:
    tx = optax.chain(tx, optax.masked(optax.set_to_zero(), lambda params: (
        jax.tree_util.tree_map_with_path(lambda p, _: not trainable(p), params))))
  if tc.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=tc.grad_accum)
  return optax.apply_if_finite(tx, max_consecutive_errors=tc.max_nan_steps), schedule


def decays(path, param) -> bool:
  """Weight decay on weight matrices and embeddings only: never on norm scales or
  biases (attention's q/k/v biases are [heads, head_dim], so ndim cannot tell), and
  a scanned stack's leading `layers` axis does not count as a dimension of the
  parameter."""
  names = [stacks.key_name(k) for k in path]
  return param.ndim - stacks.is_stacked(names) >= 2 and names[-1] != 'bias'


def opt_state_shardings(optimizer, params, mesh):
  """Moments (and accumulated gradients) take their parameter's sharding, so FSDP
  shards them too; scalars (step counts, NaN counters) are replicated."""
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  return optax.tree_map_params(
      optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, params),
      param_shardings, transform_non_params=lambda _: sharding.replicated(mesh))


def abstract_state(build: Build, mesh, optimizer):
  """(graphdef, the train state as ShapeDtypeStructs with their shardings): what
  init_state would build, without allocating or computing anything."""
  graphdef, params = abstract_params(build, mesh)
  opt_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(optimizer.init, params),
      opt_state_shardings(optimizer, params, mesh))
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
  return graphdef, {'step': step, 'params': params, 'opt_state': opt_state}


def init_state(build: Build, mesh, optimizer, seed: int, abstract=None):
  """(graphdef, a fresh train state initialised directly into its shardings);
  `abstract`: `abstract_state`'s answer, when already known."""
  graphdef, abstract = abstract or abstract_state(build, mesh, optimizer)
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build(nnx.Rngs(seed)))),
                   out_shardings=shardings['params'])()
  opt_state = jax.jit(optimizer.init, out_shardings=shardings['opt_state'])(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings['step'])
  return graphdef, {'step': step, 'params': params, 'opt_state': opt_state}


def device_memory_bytes() -> int | None:
  """What one device can hold: an accelerator's memory limit; on a CPU the memory
  the machine has free, shared by this process's devices (None: not known)."""
  device = jax.local_devices()[0]
  if device.platform != 'cpu':
    stats = device.memory_stats() or {}
    return stats.get('bytes_limit')
  try:
    with open('/proc/meminfo') as f:
      info = dict(line.split(':', 1) for line in f)
    return int(info['MemAvailable'].split()[0]) * 1024 // jax.local_device_count()
  except (OSError, KeyError, ValueError):
    return None


def check_fits(state, frozen_params=None) -> None:
  """Refuses, in one line with the estimate, a model whose parameters, gradients and
  optimizer state (`state`, e.g. `abstract_state`'s; and frozen models) alone exceed
  one device's memory: better than
  an allocation failure minutes later. Activations are not counted: a model that
  passes may still not fit (`python -m tokcom_jax.memory` measures them)."""
  available = device_memory_bytes()
  if not available:
    return
  need = (2 * per_device_bytes(state['params']) + per_device_bytes(state['opt_state'])
          + per_device_bytes(frozen_params or {}))
  if need > available:
    gb = lambda b: f'{b / 2**30:.1f} GB'
    raise TrainingError(
        f'the model needs about {gb(need)} per device for its parameters, gradients'
        f' and optimizer state, more than the {gb(available)} one device has: make it'
        ' smaller (hidden_size, layers, vocab_size) or shard it over more devices'
        ' (--config.mesh.fsdp).')


def per_device_bytes(tree) -> int:
  """Bytes that one device holds of a tree of sharded arrays or ShapeDtypeStructs."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


# -------------------------------------------------------------------- frozen models


def frozen_graphdefs(frozen: dict[str, FrozenModel]) -> dict:
  return {name: nnx.graphdef(nnx.eval_shape(lambda f=f: f.build(nnx.Rngs(0))))
          for name, f in frozen.items()}


def abstract_frozen(frozen: dict[str, FrozenModel], mesh) -> dict:
  """The frozen models' parameters as ShapeDtypeStructs (memory report, AOT)."""
  return {name: abstract_params(f.build, mesh)[1] for name, f in frozen.items()}


def load_frozen(frozen: dict[str, FrozenModel], mesh, abstract=None
                ) -> tuple[dict, dict]:
  """(parameters, {name: (step, parameter fingerprint)}) of the frozen models,
  restored from their runs onto `mesh` (`abstract`: `abstract_frozen`'s answer,
  when already known)."""
  abstract = abstract or abstract_frozen(frozen, mesh)
  params, read = {}, {}
  for name, f in frozen.items():
    if not checkpoint.checkpoint_dir(f.workdir).exists():
      raise TrainingError(f'{f.workdir!r} has no checkpoints: {f.missing_hint}')
    params[name], meta, step = checkpoint.restore_params(f.workdir, abstract[name])
    read[name] = (step, (meta.get('fingerprints') or {}).get('params'))
    logging.info('frozen %s from %s step %d', name, f.workdir, step)
  return params, read
