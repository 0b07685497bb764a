"""The jitted functions of any stage: train step, eval step, sample step.

Each is a pure function of (params or state, tokens, key, frozen params), with the
models merged from their graphdefs inside the trace, explicit shardings and (for the
train step) a donated state. The stage supplies the model code; nothing here knows
which stage it is.
"""

from __future__ import annotations

import collections
import json
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tokcom_jax.errors import TrainingError
from tokcom_jax.training import sharding


def merged(graphdef, params, frozen_graphdefs, frozen_params):
  """(model, {name: frozen model}) from their graphdefs and parameters."""
  frozen = {k: nnx.merge(frozen_graphdefs[k], p) for k, p in frozen_params.items()}
  return nnx.merge(graphdef, params), frozen


def shardings_of(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def make_train_step(stage, graphdef, frozen_graphdefs, optimizer, state_shardings,
                    frozen_shardings, mesh) -> Callable:
  """jit(step)(state, tokens, key, frozen) → (state, metrics); the state is donated.

  Gradients are taken with respect to `state['params']` only: frozen models never
  change. Randomness is `fold_in(key, step)`, so a resumed run draws what an
  uninterrupted one would.
  """
  def loss(params, tokens_BL, rng, frozen_params):
    model, frozen = merged(graphdef, params, frozen_graphdefs, frozen_params)
    return stage.loss(model, frozen, tokens_BL, rng)

  def step(state, tokens_BL, key, frozen_params):
    rng = jax.random.fold_in(key, state['step'])
    (_, metrics), grads = jax.value_and_grad(sharding.under_mesh(loss, mesh),
                                             has_aux=True)(
        state['params'], tokens_BL, rng, frozen_params)
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    metrics['grad_norm'] = optax.tree.norm(grads)
    # optax.apply_if_finite's counters: skipped steps in a row, and in the whole run.
    metrics['nonfinite_run'] = opt_state.notfinite_count
    metrics['nonfinite_total'] = opt_state.total_notfinite
    return {'step': state['step'] + 1,
            'params': optax.apply_updates(state['params'], updates),
            'opt_state': opt_state}, metrics

  replicated = sharding.replicated(mesh)
  return jax.jit(
      step, donate_argnums=0,
      in_shardings=(state_shardings, sharding.batch_sharding(mesh), replicated,
                    frozen_shardings),
      out_shardings=(state_shardings, replicated))


def _jit_stage_fn(fn, graphdef, frozen_graphdefs, mesh) -> Callable:
  """jit(f)(params, tokens, key, frozen) of a stage method fn(model, frozen, tokens,
  key), traced under the mesh, its output replicated."""
  def call(params, tokens_BL, key, frozen_params):
    model, frozen = merged(graphdef, params, frozen_graphdefs, frozen_params)
    return fn(model, frozen, tokens_BL, key)
  return jax.jit(sharding.under_mesh(call, mesh),
                 out_shardings=sharding.replicated(mesh))


def make_eval_step(stage, graphdef, frozen_graphdefs, mesh) -> Callable:
  """jit(eval)(params, tokens, key, frozen) → the stage's metrics of one batch."""
  return _jit_stage_fn(stage.eval_metrics, graphdef, frozen_graphdefs, mesh)


def make_sample_step(stage, graphdef, frozen_graphdefs, mesh) -> Callable:
  """jit(sample)(params, tokens, key, frozen) → sampled tokens [B, L], replicated."""
  return _jit_stage_fn(stage.sample, graphdef, frozen_graphdefs, mesh)


def evaluate_batches(eval_step, params, frozen_params,
                     batches: Iterable[tuple[jax.Array, jax.Array]]) -> dict[str, float]:
  """Means of the eval step's metrics over (tokens, key) batches, weighted by batch
  size: the one evaluation path of training and of `tokcom_jax.evaluate`."""
  totals, count = None, 0
  for tokens_BL, key in batches:
    m = eval_step(params, tokens_BL, key, frozen_params)
    n = tokens_BL.shape[0]
    m = jax.tree.map(lambda v: v * n, m)
    totals = m if totals is None else jax.tree.map(jnp.add, totals, m)
    count += n
  return {k: float(v) / count for k, v in jax.device_get(totals).items()}


def read_metrics(pending: list[tuple[int, dict]], max_nan_steps: int,
                 stage_name: str) -> dict[str, float]:
  """Mean metrics of dispatched steps, read from the device.

  A step whose gradient was not finite was skipped by the optimizer
  (`optax.apply_if_finite`) and is counted, not averaged; `max_nan_steps` in a row
  stop the run (nothing after the last good checkpoint is saved).
  """
  fetched = jax.device_get([m for _, m in pending])
  for (step, _), m in zip(pending, fetched):
    if m['nonfinite_run'] >= max_nan_steps:
      raise TrainingError(
          f'loss or gradients not finite for {int(m["nonfinite_run"])} steps in a'
          f' row, at step {step + 1}: lower train.{stage_name}.lr or check the'
          ' data; the last checkpoint is intact.')
  good = [m for m in fetched if m['nonfinite_run'] == 0]
  counters = ('nonfinite_run', 'nonfinite_total')
  mean = {k: float(np.mean([m[k] for m in good])) for k in fetched[0]
          if k not in counters} if good else {}
  mean['skipped_steps'] = float(len(fetched) - len(good))
  mean['nonfinite_total'] = float(fetched[-1]['nonfinite_total'])
  return mean


# ------------------------------------------------------------ reuse within a process

# Config fields no traced step reads: where the data and the run live, how often to
# log, evaluate and save. Two runs that differ only in these share their steps.
RUN_ONLY = {'data': None, 'vae_workdir': None, 'wandb': None,
            'train': ('log_every', 'eval_every', 'eval_batches', 'checkpoint_every',
                      'keep_checkpoints', 'max_nan_steps'),
            'sample': ('num_samples', 'sample_every')}
KEEP_TRACED = 8  # step sets kept per process
_TRACED: collections.OrderedDict = collections.OrderedDict()


def step_key(config, total_steps: int, graphdef, frozen_graphdefs, mesh) -> tuple:
  """What a stage's jitted steps depend on: the config less `RUN_ONLY`, the length
  of the schedule, the model structures and the mesh."""
  fields = config.to_dict()
  for name, sub in RUN_ONLY.items():
    if sub is None:
      fields.pop(name, None)
    else:
      fields[name] = {k: v for k, v in fields[name].items() if k not in sub}
  frozen = tuple(sorted(frozen_graphdefs.items()))
  return (json.dumps(fields, sort_keys=True, default=str), total_steps, graphdef,
          frozen, mesh)


def reuse(key: tuple, make: Callable[[], tuple]) -> tuple:
  """`make()`, or what it returned for the same `key` earlier in this process: a
  second run of the same shapes (a resumed run, stage 2 after stage 1 of another
  config, a test suite) reuses the jitted steps, their traces and compiled code,
  instead of tracing them again."""
  if key not in _TRACED:
    _TRACED[key] = make()
    while len(_TRACED) > KEEP_TRACED:
      _TRACED.popitem(last=False)
  _TRACED.move_to_end(key)
  return _TRACED[key]
