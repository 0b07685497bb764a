"""Orbax checkpoints: `<workdir>/checkpoints/<step>/{state,meta}`.

`state` holds the train state (params, optimizer state, step); `meta` is JSON: the
resolved config, the stage, and where the tokenizer lives. The manager keeps the last
`keep` checkpoints and the best one by validation loss; writes are asynchronous and
atomic (orbax writes to a temporary directory and renames it when complete), so a
killed run leaves either a whole checkpoint or none.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

BEST_METRIC = 'eval/loss'


class CheckpointError(RuntimeError):
  """A checkpoint that is missing or cannot be used; the message says which."""


def checkpoint_dir(workdir) -> epath.Path:
  workdir = str(workdir)
  if '://' not in workdir:  # orbax wants absolute local paths; gs:// stays as is
    workdir = os.path.abspath(workdir)
  return epath.Path(workdir) / 'checkpoints'


def manager(workdir, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  policy = pp.AnyPreservationPolicy([
      pp.LatestN(n=keep),
      pp.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1,
               keep_checkpoints_without_metrics=False),
  ])
  # Readers never save; orbax's own read_only mode would warn on every open.
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, cleanup_tmp_directories=not read_only,
      enable_async_checkpointing=True, create=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=('state', 'meta'))


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict,
         metrics: dict[str, float] | None = None, force: bool = False) -> None:
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      metrics=metrics, force=force)


def best_step(mngr: ocp.CheckpointManager) -> int | None:
  """The kept step with the lowest validation loss, else the latest."""
  scored = []
  for step in mngr.all_steps():
    metrics = mngr.metrics(step)
    if metrics and BEST_METRIC in metrics:
      scored.append((metrics[BEST_METRIC], step))
  return min(scored)[1] if scored else mngr.latest_step()


def restore(mngr: ocp.CheckpointManager, step: int, target_state) -> tuple[Any, dict]:
  """Restores onto `target_state`'s shapes and shardings (any mesh)."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  return restored['state'], restored['meta']


def read_meta(workdir, step: int | None = None) -> tuple[int, dict]:
  """(step, meta) of a run's best (or given) checkpoint, without its arrays."""
  if not checkpoint_dir(workdir).exists():
    raise CheckpointError(f'{workdir} has no checkpoints/: train it first with'
                          ' train.py, or pass the right --workdir.')
  mngr = manager(workdir, read_only=True)
  step = best_step(mngr) if step is None else step
  if step is None:
    raise CheckpointError(f'{workdir}/checkpoints holds no complete checkpoint.')
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  logging.info('%s: checkpoint step %d', workdir, step)
  return step, meta['meta']


def restore_params(workdir, abstract_params, step: int | None = None
                   ) -> tuple[Any, dict, int]:
  """Only the parameters of a run's best (or given) checkpoint, onto the shardings
  of `abstract_params` (ShapeDtypeStructs); the optimizer state is never read."""
  step, meta = read_meta(workdir, step)
  mngr = manager(workdir, read_only=True)
  item = {'params': abstract_params}
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)))
  return restored['state']['params'], meta, step
