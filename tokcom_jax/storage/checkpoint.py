"""Orbax checkpoints: `<workdir>/checkpoints/<step>/{state,meta}`.

`state` holds the train state (params, optimizer state, step); `meta` is JSON: the
resolved config, the stage, and where the tokenizer lives. The manager keeps the last
`keep` checkpoints and the best one by validation loss; writes are asynchronous and
atomic (orbax writes to a temporary directory and renames it when complete), so a
killed run leaves either a whole checkpoint or none.

A restore onto other shapes (a changed model config) is refused from the
checkpoint's metadata before any array is read.

Damage after writing (a truncated or deleted file, a flipped bit) is caught at
restore: orbax fails to read a damaged file, and `meta` holds a fingerprint of every
part of the state that must match what was read. A damaged checkpoint is moved to
`<workdir>/damaged_checkpoints/` with a warning and the previous one is used; when
none can be read, the error says so and nothing is moved.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from tokcom_jax.errors import CheckpointError
from tokcom_jax.models import stacks
from tokcom_jax.storage import files


BEST_METRIC = 'eval/loss'


def checkpoint_dir(workdir) -> epath.Path:
  workdir = str(workdir)
  if not files.is_remote(workdir):  # orbax wants absolute local paths; gs:// stays as is
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


def fingerprints(state) -> dict[str, int]:
  return {k: int(v) for k, v in jax.device_get(
      {k: fingerprint(v) for k, v in state.items()}).items()}


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict,
         metrics: dict[str, float] | None = None, force: bool = False) -> None:
  meta = {**meta, 'fingerprints': fingerprints(state)}
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      metrics=metrics, force=force)


def _check(state, meta: dict, step: int) -> None:
  expected = meta.get('fingerprints', {})
  for name, value in fingerprints(state).items():
    if name in expected and expected[name] != value:
      raise CheckpointError(f'the {name} read back from step {step} do not match'
                            ' the fingerprint written with them')


def _quarantine(mngr: ocp.CheckpointManager, step: int) -> None:
  if jax.process_index() == 0:
    src = epath.Path(mngr.directory) / str(step)
    dst = epath.Path(mngr.directory).parent / 'damaged_checkpoints' / str(step)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
      dst.rmtree()
    src.rename(dst)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f'quarantine {step}')
  mngr.reload()


def _short(error: Exception) -> str:
  while error.__cause__ is not None:  # orbax wraps tensorstore's precise error
    error = error.__cause__
  return str(error).strip().splitlines()[0][:200] if str(error).strip() else (
      type(error).__name__)


def _saved_tree(mngr: ocp.CheckpointManager, step: int):
  """The saved state's tree of array metadata (shapes), read without the arrays."""
  return ocp.StandardCheckpointHandler().metadata(
      epath.Path(mngr.directory) / str(step) / 'state')


def _check_shapes(mngr: ocp.CheckpointManager, step: int, target, prefix=(),
                  saved_tree=None) -> None:
  """Compares `target`'s shapes (under `prefix` of the saved state) with the
  checkpoint's metadata before anything is read. A restore onto other shapes fails
  in one array while orbax's reads of the others are still in flight; their
  completions then find the restore's event loop closed, and each prints a
  traceback ("Event loop is closed") long after the error."""
  saved = {'/'.join(map(stacks.key_name, path)): x.shape for path, x in
           jax.tree_util.tree_flatten_with_path(
               _saved_tree(mngr, step) if saved_tree is None else saved_tree)[0]}
  names = ['/'.join(map(stacks.key_name, prefix + tuple(path))) for path, _ in
           jax.tree_util.tree_flatten_with_path(target)[0]]
  for name, x in sorted(zip(names, jax.tree.leaves(target)),
                        key=lambda item: not item[0].startswith('params')):
    if saved.get(name) != tuple(x.shape):
      raise CheckpointError(f'it holds {name} of shape {saved.get(name)}, this config'
                            f' builds {tuple(x.shape)}')


_READ_DIRS: set[str] = set()  # checkpoint directories restores have read


def _quiet_orbax_leftovers(directory) -> None:
  """Drops what the abandoned reads of a failed restore report later (see
  _check_shapes): "Event loop is closed" and "... exception was never retrieved"
  from orbax's coroutines or about files in `directory`. Anything else is reported
  as before."""
  _READ_DIRS.add(str(directory))
  previous = sys.unraisablehook
  if getattr(previous, 'tokcom_quiet', False):
    return

  def from_orbax(report) -> bool:
    code = getattr(report.object, 'cr_code', None)
    return 'Event loop is closed' in str(report.exc_value) or (
        code is not None and 'orbax' in code.co_filename)

  hook = lambda report: None if from_orbax(report) else previous(report)
  hook.tokcom_quiet = True
  sys.unraisablehook = hook
  logging.getLogger('asyncio').addFilter(lambda record: not _from_orbax(record))


def _from_orbax(record: logging.LogRecord) -> bool:
  """An asyncio report ("Task exception was never retrieved", "_GatheringFuture
  exception was never retrieved", ...) of an error raised in orbax's reads: its text
  names orbax or a checkpoint directory being read (tensorstore's errors name the
  file; set on a future from C++, they have no Python traceback), or its traceback
  passes through orbax."""
  message = record.getMessage()  # any asyncio report ("Exception in callback", …)
  if 'orbax' in message or any(d in message for d in _READ_DIRS):
    return True
  error, seen = (record.exc_info[1] if record.exc_info else None), set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    frame = error.__traceback__
    while frame is not None:
      if 'orbax' in frame.tb_frame.f_code.co_filename:
        return True
      frame = frame.tb_next
    error = error.__cause__ or error.__context__
  return False


def restore_first_good(mngr: ocp.CheckpointManager, restore_fn, steps=None,
                       move_damaged: bool = True):
  """(step, restore_fn(step)) of the first of `steps` (default: newest first) that
  reads back whole, with a warning naming each damaged one before it.

  Training moves damaged checkpoints aside (`move_damaged`) so that their steps can
  be saved again; readers leave them be. When none reads (a changed model config,
  say), raises and moves nothing. Returns (None, None) when there are no steps.
  """
  steps = sorted(mngr.all_steps(), reverse=True) if steps is None else steps
  _quiet_orbax_leftovers(mngr.directory)  # before the first read: reports come from
  # other threads
  damaged = []
  for step in steps:
    try:
      result = restore_fn(step)
    except Exception as e:  # orbax / tensorstore raise many kinds  # noqa: BLE001
      damaged.append((step, e))
      continue
    for bad, error in damaged:
      logging.warning('checkpoint step %d in %s is damaged (%s): %s, using step %d',
                      bad, mngr.directory, _short(error),
                      'moved to damaged_checkpoints/' if move_damaged else 'skipped',
                      step)
      if move_damaged:
        _quarantine(mngr, bad)
    return step, result
  if damaged:
    step, error = damaged[0]
    raise CheckpointError(
        f'no checkpoint in {mngr.directory} can be read; step {step}:'
        f' {_short(error)}. If the model config changed, use a new --workdir.'
    ) from error
  return None, None


def best_step(mngr: ocp.CheckpointManager) -> int | None:
  """The kept step with the lowest validation loss, else the latest."""
  scored = []
  for step in mngr.all_steps():
    metrics = mngr.metrics(step)
    if metrics and BEST_METRIC in metrics:
      scored.append((metrics[BEST_METRIC], step))
  return min(scored)[1] if scored else mngr.latest_step()


def restore(mngr: ocp.CheckpointManager, step: int, target_state) -> tuple[Any, dict]:
  """Restores onto `target_state`'s shapes and shardings (any mesh), checked
  against the fingerprints saved with it."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
  _check_shapes(mngr, step, abstract)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  _check(restored['state'], restored['meta'], step)
  return restored['state'], restored['meta']


def _steps_best_first(mngr: ocp.CheckpointManager) -> list[int]:
  best = best_step(mngr)
  return [best] + [s for s in sorted(mngr.all_steps(), reverse=True) if s != best]


def _open(workdir) -> ocp.CheckpointManager:
  if not checkpoint_dir(workdir).exists():
    raise CheckpointError(f'{workdir} has no checkpoints/: train it first with'
                          ' train.py, or pass the right --workdir.')
  mngr = manager(workdir, read_only=True)
  if mngr.latest_step() is None:
    raise CheckpointError(f'{workdir}/checkpoints holds no complete checkpoint.')
  return mngr


def read_meta(workdir, step: int | None = None) -> tuple[int, dict]:
  """(step, meta) of a run's best (or given) checkpoint, without its arrays."""
  mngr = _open(workdir)
  try:
    step = best_step(mngr) if step is None else step
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  finally:
    mngr.close()
  logging.info('%s: checkpoint step %d', workdir, step)
  return step, meta['meta']


def restore_params(workdir, abstract_params, step: int | None = None
                   ) -> tuple[Any, dict, int]:
  """Only the parameters of a run's best (or given) checkpoint, onto the shardings
  of `abstract_params` (ShapeDtypeStructs); the optimizer state is never read.
  A damaged best checkpoint falls back to the newest readable one."""
  mngr = _open(workdir)

  def read(step):
    # A run saved with the other `scan_layers` restores in its layout, then converts.
    saved_tree = _saved_tree(mngr, step)
    saved, convert = stacks.as_saved(abstract_params, saved_tree['params'])
    item = {'params': saved}
    _check_shapes(mngr, step, saved, ('params',), saved_tree)
    restored = mngr.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore(),
        state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)))
    meta = restored['meta']
    _check(restored['state'], meta, step)
    return convert(restored['state']['params']), meta

  try:
    steps = [step] if step is not None else _steps_best_first(mngr)
    step, (params, meta) = restore_first_good(mngr, read, steps, move_damaged=False)
  finally:
    mngr.close()
  return params, meta, step
