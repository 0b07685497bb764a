"""The training loop of every stage: steps, evaluation, checkpoints, logs.

    train(config, workdir)      runs config.stage ('vae', 'diffusion', 'ar' or 'all')

What a stage is (model, frozen inputs, loss, eval metrics, samples) comes from
`tokcom_jax.stages`; the state, optimizer and shardings from `train_state`; the
jitted functions from `steps`; the logs from `metrics_log`. The loop dispatches each
step before reading the last one's metrics, which it reads only at log steps.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import signal
import threading
import time

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from tokcom_jax import stages
from tokcom_jax.config_checks import check_config
from tokcom_jax.data import batches, tokenizer
from tokcom_jax.errors import ConfigError
from tokcom_jax.storage import checkpoint, files, portable, workdir_lock
from tokcom_jax.training import sharding, steps, train_state
from tokcom_jax.training.metrics_log import MetricsLog


@dataclasses.dataclass
class Preemption:
  """SIGTERM (TPU maintenance, `kill`) and Ctrl-C ask for a save at the next step
  boundary; a second Ctrl-C ends the process at once, without saving."""
  reason: str | None = None
  previous: dict = dataclasses.field(default_factory=dict)

  def install(self):
    if threading.current_thread() is threading.main_thread():  # where signals go
      for signum in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # `cmd &` in a script
          self.previous[signum] = signal.signal(signum, self._request)
    return self

  def _request(self, signum, frame):
    del frame
    self.reason = 'interrupted' if signum == signal.SIGINT else 'preempted'
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.SIG_DFL)

  def uninstall(self):
    for signum, handler in self.previous.items():
      if handler is not None:
        signal.signal(signum, handler)

  def should_stop(self) -> bool:
    if jax.process_count() == 1:
      return self.reason is not None
    # Every process must agree, or the collective save would hang.
    return bool(multihost_utils.process_allgather(
        np.array(self.reason is not None)).any())


class Stopped(KeyboardInterrupt):
  """A run that saved and stopped on a signal; its message is the line to print
  (`tokcom_jax.cli` prints it and exits with `exit_code`)."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


def is_sample_step(done: int, total_steps: int, steps_per_epoch: int, sample) -> bool:
  """Every `sample.sample_every` epochs, and at the end (0 turns samples off)."""
  if sample.sample_every <= 0 or sample.num_samples <= 0:
    return False
  return done == total_steps or done % (sample.sample_every * steps_per_epoch) == 0


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs `config.stage` in `workdir`; 'all' trains the VAE, then the flow model."""
  check_config(config)  # again: --config.field=value flags apply after get_config
  with workdir_lock.hold(workdir, 'training'):
    # 'all': the VAE's run, then stage 2's; stage 2 with reflow: its teacher's, then its.
    *before, last = stages.phases(config, workdir)
    for phase in before:
      train(*phase)
    return train(*last) if last[1] != workdir else Trainer(*last).run()


_WARNED: set[str] = set()


def _warn_once(message: str | None) -> None:
  if message and message not in _WARNED and jax.process_index() == 0:
    _WARNED.add(message)
    logging.warning(message)


class Trainer:
  """One stage's run: set-up in __init__, the loop in run()."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, epath.Path(workdir)
    self.stage = stage = stages.get(config)
    self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    sharding.log_mesh(self.mesh)
    tc = config.train
    self.batch_size = tc.batch_size
    sharding.check_batch(self.batch_size, self.mesh)
    if jax.process_index() == 0:
      self.workdir.mkdir(parents=True, exist_ok=True)
    frozen = stage.frozen()
    # What cannot fit is refused before any data or model is read (any schedule).
    abstract = train_state.abstract_state(stage.build, self.mesh, train_state.make_optimizer(
        tc, 1e-4, 1, stage.trainable)[0])
    frozen_abstract = train_state.abstract_frozen(frozen, self.mesh)
    train_state.check_fits(abstract[1], frozen_abstract)
    self.frozen_graphdefs = train_state.frozen_graphdefs(frozen)
    self.frozen, read = train_state.load_frozen(frozen, self.mesh, frozen_abstract)
    self.tokenizer = tokenizer.run_tokenizer(config, stage.tokenizer_dir(self.workdir))
    if jax.process_index() == 0:  # a stage-2 run keeps its own copy of the VAE's
      tokenizer.copy_tokenizer(stage.tokenizer_dir(self.workdir),
                               self.workdir / 'tokenizer')
    self.train_windows, self.val_windows = batches.load_splits(
        config, self.tokenizer, self.batch_size)
    _warn_once(sharding.cpu_only_warning(config))  # once the run can start
    self.steps_per_epoch = batches.steps_per_epoch(self.train_windows.num_windows,
                                                   self.batch_size)
    sc = tc[stage.name]
    self.total_steps = sc.num_steps if sc.num_steps > 0 else (
        sc.epochs * self.steps_per_epoch)
    if self.total_steps <= 0:
      raise ConfigError(f'train.{stage.name}: set num_steps or epochs above 0.')
    self.optimizer, self.lr = train_state.make_optimizer(
        tc, sc.lr, self.total_steps, stage.trainable)
    self.graphdef, self.state = train_state.init_state(
        stage.build, self.mesh, self.optimizer, config.seed, abstract)
    fn_args = (stage, self.graphdef, self.frozen_graphdefs)
    self.train_step, self.eval_step, self.sample_step = steps.reuse(
        steps.step_key(config, self.total_steps, self.graphdef, self.frozen_graphdefs,
                       self.mesh),
        lambda: (steps.make_train_step(*fn_args, self.optimizer,
                                       steps.shardings_of(self.state),
                                       steps.shardings_of(self.frozen), self.mesh),
                 steps.make_eval_step(*fn_args, self.mesh),
                 steps.make_sample_step(*fn_args, self.mesh)))
    self.key = jax.random.key(config.seed)
    self.rows = sharding.process_rows(self.batch_size, self.mesh)
    self.ckpt = checkpoint.manager(self.workdir, keep=tc.keep_checkpoints)
    # Paths relative to the run, and which checkpoint of each frozen run: a moved
    # run loads, and never with another VAE (tokcom_jax.storage.portable).
    self.meta = {'stage': stage.name, 'config': config.to_dict(),
                 'tokenizer_dir': 'tokenizer',
                 'frozen': {k: portable.record(self.workdir, f.workdir, *read[k])
                            for k, f in frozen.items()}}
    # The loop's state, set when run() starts: the metrics log, metrics not yet read
    # back from the device, the epoch's losses, the last logged metrics.
    self.log: MetricsLog | None = None
    self.pending, self.epoch_losses = [], []  # [(step, metrics)], [loss]
    self.last: dict[str, float] = {}
    self.t_log = 0.0

  def _batch(self, windows: batches.Windows, indices: np.ndarray) -> jax.Array:
    return sharding.global_batch(windows.get(indices[self.rows]), self.mesh,
                                 self.batch_size)

  def evaluate(self) -> dict[str, float]:
    """Eval metrics over `eval_batches` validation batches, the same noise each time."""
    n, seed = self.val_windows.num_windows, self.config.seed + 1
    val_batches = ((self._batch(self.val_windows,
                                batches.eval_indices(b, n, self.batch_size)),
                    jax.random.fold_in(jax.random.key(seed), b))
                   for b in range(batches.eval_batch_count(
                       self.config.train.eval_batches, n, self.batch_size)))
    ev = steps.evaluate_batches(self.eval_step, self.state['params'], self.frozen,
                                val_batches)
    return {f'eval/{k}': v for k, v in ev.items()}

  def _restore(self) -> int:
    step, restored = checkpoint.restore_first_good(
        self.ckpt, lambda step: checkpoint.restore(self.ckpt, step, self.state))
    if step is not None:
      portable.check_resume(restored[1], self.meta)
      self.state = restored[0]
      logging.info('resumed from %s step %d', self.ckpt.directory, step)
    return step or 0

  def _save(self, step: int, metrics=None, force=False):
    checkpoint.save(self.ckpt, step, self.state, self.meta, metrics, force=force)

  def run(self, stop_after: int | None = None) -> dict[str, float]:
    """Trains to the end, or until step `stop_after` (then saves and returns). On
    SIGTERM or Ctrl-C it saves the current step and raises Stopped."""
    start = self._restore()
    if start == 0:  # parameters measured on data (the flow's latent statistics)
      n = self.train_windows.num_windows
      self.state['params'] = self.stage.prepare(
          self.state['params'], self.frozen_graphdefs, self.frozen,
          (self._batch(self.train_windows, batches.eval_indices(b, n, self.batch_size))
           for b in itertools.count()))
    if jax.process_index() == 0:
      files.write_text(self.workdir / 'config.json',
                       self.config.to_json_best_effort(indent=2))
    self.log = MetricsLog(self.workdir, self.config, start)
    preemption = Preemption().install()
    try:
      self._loop(start, preemption, stop_after)
      checkpoint.finish(self.ckpt)
      stopped = preemption.should_stop()  # a signal after the last step stops `:all`
    finally:
      preemption.uninstall()
      self.log.close()
    last = self.ckpt.latest_step()
    self.ckpt.close()
    if stopped:
      reason = preemption.reason or 'preempted'  # (on the processes not signalled)
      where = self.workdir / 'checkpoints' / str(last)
      raise Stopped(f'{reason}: saved step {last} to {where}; run the same command to'
                    ' resume.', 130 if reason == 'interrupted' else 143)
    return self.last

  def _loop(self, start: int, preemption: Preemption, stop_after) -> None:
    """The steps from `start`, until the end, `stop_after` or a signal."""
    tc = self.config.train
    self.pending, self.epoch_losses, self.last = [], [], {}
    self.t_log = time.perf_counter()
    eval_every = tc.eval_every or self.steps_per_epoch
    bar = tqdm(total=self.total_steps, initial=start, desc=self.stage.name,
               unit='step', disable=jax.process_index() != 0, dynamic_ncols=True)
    for step in range(start, self.total_steps):
      if preemption.should_stop() or step == stop_after:
        self._flush(bar)
        if self.ckpt.latest_step() != step:  # an eval may just have saved it
          self._save(step, force=True)
        break
      idx = batches.train_indices(step, self.config.seed,
                                  self.train_windows.num_windows, self.batch_size)
      # Dispatched asynchronously: metrics are read only at log steps.
      self.state, metrics = self.train_step(
          self.state, self._batch(self.train_windows, idx), self.key, self.frozen)
      self.pending.append((step, metrics))
      done = step + 1
      is_eval = done % eval_every == 0 or done == self.total_steps
      is_ckpt = tc.checkpoint_every and done % tc.checkpoint_every == 0
      if done % tc.log_every == 0 or is_eval or is_ckpt:
        self._flush(bar)  # also the NaN guard: nothing non-finite is ever saved
      bar.update(1)
      if is_eval:
        self._save(done, {checkpoint.BEST_METRIC: self._evaluate_and_log(done, bar)})
      elif is_ckpt:
        self._save(done)
      if is_sample_step(done, self.total_steps, self.steps_per_epoch,
                        self.config.sample):
        self._log_samples(done)
    bar.close()

  def _flush(self, bar) -> None:
    """Reads and logs the metrics of the steps dispatched since the last log."""
    checkpoint.check(self.ckpt)  # a background save that failed stops the run here
    if not self.pending:
      return
    mean = steps.read_metrics(self.pending, self.config.train.max_nan_steps,
                              self.stage.name)
    done, now = self.pending[-1][0] + 1, time.perf_counter()
    row = {f'train/{k}': v for k, v in mean.items()}
    row['lr'] = float(self.lr((done - 1) // self.config.train.grad_accum))
    row['tokens_per_sec'] = (len(self.pending) * self.batch_size
                             * self.config.max_length / (now - self.t_log))
    self.t_log = now
    extra = {}
    if 'loss' in mean:  # else every pending step was skipped
      self.epoch_losses.extend([mean['loss']] * len(self.pending))
      bar.set_postfix(loss=f'{mean["loss"]:.4f}', tok_s=f'{row["tokens_per_sec"]:.0f}')
      extra = self.stage.wandb_batch_names(mean)
    self.log.write(done, row, extra)
    self.pending = []
    self.last.update(row)

  def _evaluate_and_log(self, done: int, bar) -> float:
    ev, name, extra = self.evaluate(), self.stage.name, {}
    if done % self.steps_per_epoch == 0 or done == self.total_steps:
      # The original's epoch-level names.
      extra = {f'{name}/train_loss': float(np.mean(self.epoch_losses or [np.nan])),
               f'{name}/val_loss': ev['eval/loss'], f'{name}/lr': self.last['lr'],
               'epoch': done / self.steps_per_epoch}
      self.epoch_losses = []
    self.log.write(done, ev, extra)
    self.last.update(ev)
    bar.write(f'{name} step {done}: ' + ', '.join(
        f'{k}={v:.4f}' for k, v in ev.items() if not k[-1].isdigit()))
    return ev['eval/loss']

  def _log_samples(self, done: int) -> None:
    """The stage's samples for the first validation windows: samples.jsonl and a
    wandb table. Every process takes part in the jitted call; process 0 writes."""
    n = self.config.sample.num_samples
    real = self.val_windows.get(np.arange(n) % self.val_windows.num_windows)
    tokens = jax.make_array_from_callback(real.shape, sharding.replicated(self.mesh),
                                          lambda index: real[index])
    key = jax.random.fold_in(jax.random.key(self.config.seed + 2), done)
    out = np.asarray(self.sample_step(self.state['params'], tokens, key,
                                      self.frozen).addressable_data(0))
    rows = self.stage.sample_rows(
        real, out, lambda ids: self.tokenizer.decode(ids.tolist()))
    self.log.write_samples(done, self.stage.sample_table,
                           self.stage.sample_columns, rows)
