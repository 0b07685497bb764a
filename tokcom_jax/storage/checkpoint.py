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
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from tokcom_jax.errors import CheckpointError
from tokcom_jax.models import stacks
from tokcom_jax.storage import files, fingerprints, orbax_reports


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
  if not read_only:  # a failed save is reported once, by `save` (`_failed`)
    orbax_reports.quiet_failed_saves()
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, cleanup_tmp_directories=not read_only,
      enable_async_checkpointing=True, create=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=('state', 'meta'))


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict,
         metrics: dict[str, float] | None = None, force: bool = False) -> None:
  """Starts saving `step` (written in the background). A save that failed (a full
  disk, or any other error out of orbax: it surfaces here at the next save, or in
  `finish`) raises one CheckpointError naming it (`_failed`)."""
  finish(mngr)
  meta = {**meta, 'fingerprints': fingerprints.of(state)}
  _failed(mngr, step, lambda: mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      metrics=metrics, force=force))
  _SAVING[id(mngr)] = step


_SAVING: dict[int, int] = {}  # the step each manager is saving in the background


def check(mngr: ocp.CheckpointManager) -> None:
  """Raises as `save` does if the save in flight has already failed (no waiting)."""
  _failed(mngr, _SAVING.get(id(mngr)), mngr.check_for_errors)


def finish(mngr: ocp.CheckpointManager) -> None:
  """Waits for the save in flight; raises as `save` does if it failed."""
  _failed(mngr, _SAVING.pop(id(mngr), None), mngr.wait_until_finished)


def _failed(mngr: ocp.CheckpointManager, step: int | None, call) -> None:
  """call(); an error out of it (orbax raises ValueError, OSError, …) becomes one
  line with the step, the directory, its free space and what to do, once the
  partial temporary checkpoint is removed; every finished checkpoint stays."""
  try:
    call()
  except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many kinds
    directory = epath.Path(mngr.directory)
    if jax.process_index() == 0:
      for partial in directory.glob('*.orbax-checkpoint-tmp*'):
        shutil.rmtree(partial, ignore_errors=True)
    finished = max((int(p.name) for p in directory.iterdir() if p.name.isdigit()),
                   default=0)
    free = ''
    if not files.is_remote(directory):
      free = f' ({shutil.disk_usage(directory).free / 2**20:.1f} MiB free there)'
    reason = ('the disk is full' if 'No space left' in str(e) or
              getattr(e, 'errno', None) == 28 else _short(e))
    raise CheckpointError(
        f'saving checkpoint step {step} to {directory} failed: {reason}{free}. Free'
        ' some space (or use another --workdir), then run the same command: it'
        f' resumes from step {finished}.') from e


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


def restore_first_good(mngr: ocp.CheckpointManager, restore_fn, steps=None,
                       move_damaged: bool = True):
  """(step, restore_fn(step)) of the first of `steps` (default: newest first) that
  reads back whole, with a warning naming each damaged one before it.

  Training moves damaged checkpoints aside (`move_damaged`) so that their steps can
  be saved again; readers leave them be. When none reads (a changed model config,
  say), raises and moves nothing. Returns (None, None) when there are no steps.
  """
  steps = sorted(mngr.all_steps(), reverse=True) if steps is None else steps
  # Before the first read: the reports come from other threads.
  orbax_reports.quiet_leftovers(mngr.directory)
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
  fingerprints.check(restored['state'], restored['meta'], step)
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


def _reading(workdir, read):
  """read(manager) over a run's committed checkpoints. A run that trains meanwhile
  saves new steps and deletes old ones under the reader: when a read fails and the
  checkpoints changed while it ran, it starts again on the new ones."""
  for attempt in range(READ_ATTEMPTS):
    before = _listing(workdir)
    try:
      mngr = _open(workdir)
      try:
        return read(mngr)
      finally:
        mngr.close()
    except Exception:  # orbax / tensorstore / the file system: many kinds
      if attempt + 1 == READ_ATTEMPTS or _listing(workdir) == before:
        raise
      logging.info('%s: checkpoints changed while read (it trains); reading again',
                   workdir)


READ_ATTEMPTS = 10


def _listing(workdir) -> frozenset[str]:
  try:
    return frozenset(p.name for p in checkpoint_dir(workdir).iterdir())
  except OSError:
    return frozenset()


def read_meta(workdir, step: int | None = None) -> tuple[int, dict]:
  """(step, meta) of a run's best (or given) checkpoint, without its arrays; an
  unreadable best one falls back to the newest readable."""
  def read(mngr):
    return restore_first_good(
        mngr, lambda s: mngr.restore(s, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))['meta'],
        [step] if step is not None else _steps_best_first(mngr), move_damaged=False)

  step, meta = _reading(workdir, read)
  logging.info('%s: checkpoint step %d', workdir, step)
  return step, meta


def restore_params(workdir, abstract_params, step: int | None = None
                   ) -> tuple[Any, dict, int]:
  """Only the parameters of a run's best (or given) checkpoint, onto the shardings
  of `abstract_params` (ShapeDtypeStructs); the optimizer state is never read.
  A damaged best checkpoint falls back to the newest readable one."""
  def read(mngr):
    def read_step(step):
      # A run saved with the other `scan_layers` restores in its layout, then
      # converts.
      saved_tree = _saved_tree(mngr, step)
      saved, convert = stacks.as_saved(abstract_params, saved_tree['params'])
      item = {'params': saved}
      _check_shapes(mngr, step, saved, ('params',), saved_tree)
      restored = mngr.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore(),
          state=ocp.args.PyTreeRestore(
              item=item, partial_restore=True,
              restore_args=ocp.checkpoint_utils.construct_restore_args(item))))
      meta = restored['meta']
      fingerprints.check(restored['state'], meta, step)
      return convert(restored['state']['params']), meta

    steps = [step] if step is not None else _steps_best_first(mngr)
    return restore_first_good(mngr, read_step, steps, move_damaged=False)

  step, (params, meta) = _reading(workdir, read)
  return params, meta, step
