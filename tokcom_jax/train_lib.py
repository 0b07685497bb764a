"""Training for both stages: state, jitted steps, evaluation and the loop.

The train state is a plain dict {step, params, opt_state} of global arrays. Models are
Flax NNX modules used functionally: `nnx.merge(graphdef, params)` inside the jitted,
pure step function, which takes (state, batch, key[, frozen VAE params]) with explicit
shardings and donates the state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from tokcom_jax import checkpoint, data, dit, flow, sharding, vae
from tokcom_jax.config_lib import ConfigError, validate

EVAL_TIMES = (0.1, 0.5, 0.9)  # t values at which the flow model is evaluated


class TrainingError(RuntimeError):
  """The run cannot go on (a non-finite loss, a missing stage-1 run)."""


# --------------------------------------------------------------------------- models


def build_model(config, stage: str, seed: int = 0) -> nnx.Module:
  rngs = nnx.Rngs(seed)
  if stage == 'vae':
    return vae.ChunkVAE(vae.VAEConfig.from_config(config), rngs=rngs)
  return dit.LatentFlowTransformer(dit.DiTConfig.from_config(config), rngs=rngs)


def abstract_params(config, stage: str, mesh):
  """(graphdef, abstract params with shardings) without allocating anything."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(config, stage)))
  shardings = nnx.to_pure_dict(sharding.param_shardings(abstract, mesh))
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nnx.to_pure_dict(abstract), shardings)
  return graphdef, abstract


def make_optimizer(config, stage: str, total_steps: int) -> optax.GradientTransformation:
  """AdamW, linear warm-up then cosine decay to 10%, global-norm clipping, and
  gradient accumulation over `grad_accum` batches. A gradient with a NaN or inf is
  skipped (no update, no accumulation); the loop stops the run after
  `max_nan_steps` in a row, before optax would give up and apply one."""
  tc = config.train
  updates = max(total_steps // tc.grad_accum, 1)
  lr = optax.warmup_cosine_decay_schedule(
      0.0, tc[stage].lr, min(tc.warmup_steps, updates - 1) if updates > 1 else 0,
      updates, end_value=0.1 * tc[stage].lr)
  # No weight decay on vectors (norm scales, biases).
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(tc.grad_clip),
      optax.adamw(lr, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay,
                  mask=decay_mask))
  if tc.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=tc.grad_accum)
  return optax.apply_if_finite(tx, max_consecutive_errors=tc.max_nan_steps), lr


def opt_state_shardings(optimizer, params, mesh):
  """Moments (and accumulated gradients) take their parameter's sharding, so FSDP
  shards them too; scalars (step counts, NaN counters) are replicated."""
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  return optax.tree_map_params(
      optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, params),
      param_shardings, transform_non_params=lambda _: sharding.replicated(mesh))


def init_state(config, stage: str, mesh, optimizer):
  """A fresh train state, initialised directly into its shardings."""
  graphdef, abstract = abstract_state(config, stage, mesh, optimizer)
  shardings = jax.tree.map(lambda x: x.sharding, abstract)

  def init():
    return nnx.to_pure_dict(nnx.state(build_model(config, stage, config.seed)))

  params = jax.jit(init, out_shardings=shardings['params'])()
  opt_state = jax.jit(optimizer.init, out_shardings=shardings['opt_state'])(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings['step'])
  return graphdef, {'step': step, 'params': params, 'opt_state': opt_state}


def abstract_state(config, stage: str, mesh, optimizer):
  """(graphdef, the train state as ShapeDtypeStructs with their shardings): what
  init_state would build, without allocating or computing anything."""
  graphdef, params = abstract_params(config, stage, mesh)
  opt_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(optimizer.init, params),
      opt_state_shardings(optimizer, params, mesh))
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
  return graphdef, {'step': step, 'params': params, 'opt_state': opt_state}


def per_device_bytes(tree) -> int:
  """Bytes that one device holds of a tree of sharded arrays or ShapeDtypeStructs."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------- steps


def vae_loss(graphdef, params, tokens_BL, rng):
  model = nnx.merge(graphdef, params)
  return vae.loss_fn(model, tokens_BL, jnp.ones_like(tokens_BL), rng)


def diffusion_loss(graphdef, params, tokens_BL, rng, vae_graphdef, vae_params,
                   flow_cfg: flow.FlowConfig, t_B=None):
  return flow.diffusion_loss_fn(
      nnx.merge(graphdef, params), nnx.merge(vae_graphdef, vae_params), tokens_BL,
      jnp.ones_like(tokens_BL), rng, flow_cfg, t_B)


def stage_loss(config, stage: str, graphdef, vae_graphdef=None) -> Callable:
  """loss(params, tokens, rng[, frozen VAE params]) → (loss, metrics) of a stage."""
  if stage == 'vae':
    return lambda p, tokens, rng: vae_loss(graphdef, p, tokens, rng)
  flow_cfg = flow.FlowConfig.from_config(config)
  return lambda p, tokens, rng, vp: diffusion_loss(graphdef, p, tokens, rng,
                                                   vae_graphdef, vp, flow_cfg)


def make_train_step(loss: Callable, optimizer, state_shardings, mesh,
                    frozen_shardings=()) -> Callable:
  """jit(step)(state, tokens, key, *frozen) → (state, metrics); the state is donated.

  `loss(params, tokens, rng, *frozen)` returns (loss, metrics). Gradients are taken
  with respect to `params` only: frozen inputs never change.
  """
  def step(state, tokens_BL, key, *frozen):
    rng = jax.random.fold_in(key, state['step'])
    (_, metrics), grads = jax.value_and_grad(sharding.under_mesh(loss, mesh),
                                             has_aux=True)(
        state['params'], tokens_BL, rng, *frozen)
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    metrics['grad_norm'] = optax.tree.norm(grads)
    # apply_if_finite's counters: skipped steps in a row, and in the whole run.
    metrics['nonfinite_run'] = opt_state.notfinite_count
    metrics['nonfinite_total'] = opt_state.total_notfinite
    new_state = {'step': state['step'] + 1,
                 'params': optax.apply_updates(state['params'], updates),
                 'opt_state': opt_state}
    return new_state, metrics

  replicated = sharding.replicated(mesh)
  return jax.jit(
      step, donate_argnums=0,
      in_shardings=(state_shardings, sharding.batch_sharding(mesh), replicated,
                    *frozen_shardings),
      out_shardings=(state_shardings, replicated))


def make_eval_step(config, stage: str, graphdef, mesh, vae_graphdef=None) -> Callable:
  """jit(eval)(params, tokens, key, *frozen) → metrics of one validation batch."""
  if stage == 'vae':
    def evaluate(params, tokens_BL, key):
      del key
      return vae_loss(graphdef, params, tokens_BL, None)[1]
  else:
    flow_cfg = flow.FlowConfig.from_config(config)

    def evaluate(params, tokens_BL, key, vae_params):
      out = {}
      for i, t in enumerate(EVAL_TIMES):
        t_B = jnp.full((tokens_BL.shape[0],), t)
        _, m = diffusion_loss(graphdef, params, tokens_BL, jax.random.fold_in(key, i),
                              vae_graphdef, vae_params, flow_cfg, t_B)
        out.update({f'ce_t{t}': m['ce'], f'mse_t{t}': m['mse'],
                    f'token_accuracy_t{t}': m['token_accuracy']})
      out['ce'] = jnp.mean(jnp.stack([out[f'ce_t{t}'] for t in EVAL_TIMES]))
      out['mse'] = jnp.mean(jnp.stack([out[f'mse_t{t}'] for t in EVAL_TIMES]))
      out['loss'] = flow_cfg.ce_weight * out['ce'] + flow_cfg.mse_weight * out['mse']
      return out
  return jax.jit(sharding.under_mesh(evaluate, mesh),
                 out_shardings=sharding.replicated(mesh))


def make_sample_step(config, stage: str, graphdef, mesh, vae_graphdef=None) -> Callable:
  """jit(sample)(params, tokens, key, *frozen) → argmax tokens [B, L], replicated.

  Stage 1 reconstructs `tokens` through the latent mean; stage 2 ignores their
  values and generates as many sequences with the Euler sampler.
  """
  if stage == 'vae':
    def sample(params, tokens_BL, key):
      del key
      model = nnx.merge(graphdef, params)
      return jnp.argmax(model.decode(model.encode(tokens_BL)[0]), axis=-1)
  else:
    B_N_Z = lambda tokens: (tokens.shape[0], tokens.shape[1] // config.chunk_size,
                            config.vae.latent_dim)

    def sample(params, tokens_BL, key, vae_params):
      x0 = flow.sample_noise(key, B_N_Z(tokens_BL), config.flow.noise_std)
      z = flow.euler_sample(nnx.merge(graphdef, params), x0, config.sample.steps)
      return jnp.argmax(nnx.merge(vae_graphdef, vae_params).decode(z), axis=-1)
  return jax.jit(sharding.under_mesh(sample, mesh),
                 out_shardings=sharding.replicated(mesh))


# ------------------------------------------------------------------------- logging


class MetricsLog:
  """metrics.jsonl always; wandb when enabled; process 0 only."""

  def __init__(self, workdir: epath.Path, config, stage: str, resume_step: int):
    self.enabled = jax.process_index() == 0
    self.path = workdir / 'metrics.jsonl'
    self.wandb = None
    if not self.enabled:
      return
    # Drop lines a killed run wrote after its last checkpoint.
    for path in (self.path, workdir / 'samples.jsonl'):
      truncate_jsonl(path, resume_step)
    mode = os.environ.get('WANDB_MODE', config.wandb.mode)
    if mode != 'disabled':
      import wandb  # lazily: only process 0 of runs that log to it
      if mode == 'online' and not (os.environ.get('WANDB_API_KEY')
                                   or _wandb_logged_in()):
        logging.warning('wandb: no API key, logging offline')
        mode = 'offline'
      self.wandb = wandb.init(project=config.wandb.project, mode=mode,
                              config=config.to_dict(), dir=str(workdir),
                              name=f'{workdir.name}', resume='allow')

  def write(self, step: int, metrics: dict[str, Any], wandb_extra=None) -> None:
    if not self.enabled:
      return
    row = {'step': step, **{k: _to_python(v) for k, v in metrics.items()}}
    with self.path.open('a') as f:
      f.write(json.dumps(row) + '\n')
    if self.wandb is not None:
      self.wandb.log({**row, **(wandb_extra or {})}, step=step)

  def close(self):
    if self.wandb is not None:
      self.wandb.finish()


def truncate_jsonl(path: epath.Path, last_step: int) -> None:
  """Keeps the rows of a JSON-lines file up to `last_step` (a torn last line goes)."""
  if not path.exists():
    return
  rows = []
  for line in path.read_text().splitlines():
    try:
      if json.loads(line)['step'] <= last_step:
        rows.append(line)
    except (json.JSONDecodeError, KeyError, TypeError):
      pass
  tmp = path.parent / (path.name + '.tmp')
  tmp.write_text(''.join(l + '\n' for l in rows))
  tmp.replace(path)


def _wandb_logged_in() -> bool:
  return os.path.exists(os.path.expanduser('~/.netrc'))


def _to_python(v):
  if isinstance(v, (np.generic, np.ndarray, jax.Array)):
    return float(v)
  return v


# ---------------------------------------------------------------------------- loop


@dataclasses.dataclass
class Preemption:
  """SIGTERM (TPU maintenance, `kill`) asks for a save at the next step boundary."""
  requested: bool = False

  def install(self):
    signal.signal(signal.SIGTERM, lambda *_: setattr(self, 'requested', True))
    return self

  def should_stop(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    # Every process must agree, or the collective save would hang.
    return bool(multihost_utils.process_allgather(np.array(self.requested)).any())


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs `config.stage` ('vae', 'diffusion' or 'all') in `workdir`."""
  validate(config)  # again: --config.field=value flags apply after get_config
  if config.stage == 'all':
    vae_dir = os.path.join(workdir, 'vae')
    train(_with(config, stage='vae'), vae_dir)
    return train(_with(config, stage='diffusion', vae_workdir=vae_dir),
                 os.path.join(workdir, 'diffusion'))
  return Trainer(config, workdir).run()


def _absolute(path) -> str:
  path = str(path)
  return path if '://' in path else os.path.abspath(path)


def _with(config, **fields):
  config = ml_collections.ConfigDict(config.to_dict())
  config.update(fields)
  config.lock()
  return config


class Trainer:
  """One stage's run: set-up in __init__, the loop in run()."""

  def __init__(self, config, workdir: str):
    self.config, self.stage = config, config.stage
    self.workdir = epath.Path(workdir)
    self.is_main = jax.process_index() == 0
    mc = config.mesh
    self.mesh = sharding.make_mesh(mc.data, mc.fsdp)
    sharding.log_mesh(self.mesh)
    tc = config.train
    self.batch_size = tc.batch_size
    if self.batch_size % jax.device_count():
      raise ConfigError(f'batch_size {self.batch_size} is not divisible by the'
                        f' {jax.device_count()} devices the batch is split over.')
    if self.is_main:
      self.workdir.mkdir(parents=True, exist_ok=True)

    self.frozen, self.frozen_shardings, vae_graphdef = (), (), None
    if self.stage == 'diffusion':
      vae_graphdef, vae_params = self._load_vae()
      self.frozen = (vae_params,)
      self.frozen_shardings = (jax.tree.map(lambda x: x.sharding, vae_params),)
    self.tokenizer = self._tokenizer()
    if len(self.tokenizer) > config.vocab_size:
      raise ConfigError(f'the tokenizer has {len(self.tokenizer)} tokens but'
                        f' vocab_size is {config.vocab_size}: set'
                        f' --config.vocab_size={len(self.tokenizer)} or more.')
    self.train_windows, self.val_windows = self._data()

    steps_per_epoch = data.steps_per_epoch(self.train_windows.num_windows,
                                           self.batch_size)
    self.steps_per_epoch = steps_per_epoch
    sc = tc[self.stage]
    self.total_steps = sc.num_steps if sc.num_steps > 0 else sc.epochs * steps_per_epoch
    if self.total_steps <= 0:
      raise ConfigError(f'train.{self.stage}: set num_steps or epochs above 0.')
    self.optimizer, self.lr = make_optimizer(config, self.stage, self.total_steps)
    self.graphdef, self.state = init_state(config, self.stage, self.mesh,
                                           self.optimizer)
    state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
    loss = stage_loss(config, self.stage, self.graphdef, vae_graphdef)
    self.train_step = make_train_step(loss, self.optimizer, state_shardings,
                                      self.mesh, self.frozen_shardings)
    self.eval_step = make_eval_step(config, self.stage, self.graphdef, self.mesh,
                                    vae_graphdef)
    self.sample_step = make_sample_step(config, self.stage, self.graphdef, self.mesh,
                                        vae_graphdef)
    self.key = jax.random.key(config.seed)
    self.rows = sharding.process_rows(self.batch_size, self.mesh)
    self.ckpt = checkpoint.manager(self.workdir, keep=tc.keep_checkpoints)
    self.meta = {'stage': self.stage, 'config': config.to_dict(),
                 'tokenizer_dir': _absolute(self._tokenizer_dir()),
                 'vae_workdir': _absolute(config.vae_workdir if self.stage ==
                                          'diffusion' else self.workdir)}

  # ----- set-up pieces

  def _tokenizer_dir(self) -> epath.Path:
    if self.stage == 'diffusion':
      return epath.Path(self.config.vae_workdir) / 'tokenizer'
    return self.workdir / 'tokenizer'

  def _tokenizer(self):
    c = self.config
    save_dir = self._tokenizer_dir()
    texts = lambda: data.iter_documents(c.data.source, 'train', c.data.text_column,
                                        c.data.train_split)
    if self.is_main:
      tokenizer = data.load_tokenizer(c.tokenizer, save_dir, texts)
    if jax.process_count() > 1:  # the others read what process 0 trained and saved
      multihost_utils.sync_global_devices('tokenizer')
      if not self.is_main:
        tokenizer = data.load_tokenizer(c.tokenizer, save_dir, texts)
    return tokenizer

  def _data(self):
    c = self.config
    windows = []
    for split, hf_split in (('train', c.data.train_split),
                            ('validation', c.data.val_split)):
      stream = data.load_token_stream(c.data.source, split, self.tokenizer,
                                      c.data.cache_dir or None, c.data.text_column,
                                      hf_split)
      w = data.Windows(stream, c.max_length)
      data.check_enough(w, self.batch_size, split, c.data.source)
      windows.append(w)
    logging.info('data: %d train / %d validation windows of %d tokens',
                 windows[0].num_windows, windows[1].num_windows, c.max_length)
    return windows

  def _load_vae(self):
    vae_dir = self.config.vae_workdir
    if not checkpoint.checkpoint_dir(vae_dir).exists():
      raise TrainingError(
          f'stage 2 needs a trained VAE, but {vae_dir!r} has no checkpoints: run'
          ' stage 1 first (train.py --config …:vae), or set --config.vae_workdir.')
    graphdef, abstract = abstract_params(self.config, 'vae', self.mesh)
    params, meta, step = checkpoint.restore_params(vae_dir, abstract)
    logging.info('stage 2: frozen VAE from %s step %d', vae_dir, step)
    return graphdef, params

  # ----- the loop

  def _batch(self, windows: data.Windows, indices: np.ndarray) -> jax.Array:
    local = windows.get(indices[self.rows])
    return sharding.global_batch(local, self.mesh, self.batch_size)

  def evaluate(self) -> dict[str, float]:
    tc = self.config.train
    totals = None
    for b in range(tc.eval_batches):
      idx = data.eval_indices(b, self.val_windows.num_windows, self.batch_size)
      # The same noise at every evaluation, so that eval losses are comparable.
      key = jax.random.fold_in(jax.random.key(self.config.seed + 1), b)
      m = self.eval_step(self.state['params'], self._batch(self.val_windows, idx),
                         key, *self.frozen)
      totals = m if totals is None else jax.tree.map(jnp.add, totals, m)
    return {f'eval/{k}': float(v) / tc.eval_batches for k, v in totals.items()}

  def _restore(self) -> int:
    step, restored = checkpoint.restore_first_good(
        self.ckpt, lambda step: checkpoint.restore(self.ckpt, step, self.state))
    if step is None:
      return 0
    self.state = restored[0]
    logging.info('resumed from %s step %d', self.ckpt.directory, step)
    return step

  def _check_finite(self, pending: list[tuple[int, dict]]) -> dict[str, float]:
    """Reads the pending steps' metrics. Steps whose gradient was not finite were
    skipped by the optimizer and are counted; `max_nan_steps` in a row stop the run
    (nothing after the last good checkpoint is saved)."""
    fetched = jax.device_get([m for _, m in pending])
    limit = self.config.train.max_nan_steps
    for (step, _), m in zip(pending, fetched):
      if m['nonfinite_run'] >= limit:
        raise TrainingError(
            f'loss or gradients not finite for {int(m["nonfinite_run"])} steps in a'
            f' row, at step {step + 1}: lower train.{self.stage}.lr or check the'
            ' data; the last checkpoint is intact.')
    good = [m for m in fetched if m['nonfinite_run'] == 0]
    mean = {k: float(np.mean([m[k] for m in good])) for k in fetched[0]
            if k not in ('nonfinite_run', 'nonfinite_total')} if good else {}
    mean['skipped_steps'] = float(len(fetched) - len(good))
    mean['nonfinite_total'] = float(fetched[-1]['nonfinite_total'])
    return mean

  def _save(self, step: int, metrics=None, force=False):
    checkpoint.save(self.ckpt, step, self.state, self.meta, metrics, force=force)

  def run(self, stop_after: int | None = None) -> dict[str, float]:
    """Trains to the end (or until step `stop_after`, then saves as on SIGTERM)."""
    tc, stage = self.config.train, self.stage
    start = self._restore()
    if self.is_main:
      (self.workdir / 'config.json').write_text(self.config.to_json_best_effort(indent=2))
    self.log = MetricsLog(self.workdir, self.config, stage, start)
    preemption = Preemption().install()
    self.pending, self.epoch_losses, self.last = [], [], {}
    self.t_log = time.perf_counter()
    eval_every = tc.eval_every or self.steps_per_epoch
    bar = tqdm(total=self.total_steps, initial=start, desc=stage, unit='step',
               disable=not self.is_main, dynamic_ncols=True)
    for step in range(start, self.total_steps):
      if preemption.should_stop() or step == stop_after:
        self._flush(bar)
        if self.ckpt.latest_step() != step:  # an eval may just have saved it
          self._save(step, force=True)
        logging.warning('stopped: saved step %d in %s', step, self.workdir)
        break
      idx = data.train_indices(step, self.config.seed,
                               self.train_windows.num_windows, self.batch_size)
      # Dispatched asynchronously: metrics are read only at log steps.
      self.state, metrics = self.train_step(self.state, self._batch(
          self.train_windows, idx), self.key, *self.frozen)
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
      if self._is_sample_step(done):
        self._log_samples(done)
    bar.close()
    self.ckpt.wait_until_finished()
    self.log.close()
    return self.last

  def _flush(self, bar) -> None:
    """Reads and logs the metrics of the steps dispatched since the last log."""
    if not self.pending:
      return
    mean = self._check_finite(self.pending)
    done = self.pending[-1][0] + 1
    now = time.perf_counter()
    row = {f'train/{k}': v for k, v in mean.items()}
    row['lr'] = float(self.lr((done - 1) // self.config.train.grad_accum))
    row['tokens_per_sec'] = (len(self.pending) * self.batch_size
                             * self.config.max_length / (now - self.t_log))
    self.t_log = now
    if 'loss' in mean:  # else every pending step was skipped
      self.epoch_losses.extend([mean['loss']] * len(self.pending))
      bar.set_postfix(loss=f'{mean["loss"]:.4f}', tok_s=f'{row["tokens_per_sec"]:.0f}')
    self.log.write(done, row, self._wandb_batch_names(mean))
    self.pending = []
    self.last.update(row)

  def _evaluate_and_log(self, done: int, bar) -> float:
    ev = self.evaluate()
    extra = {}
    if done % self.steps_per_epoch == 0 or done == self.total_steps:
      stage = self.stage  # the original's epoch-level names
      extra = {f'{stage}/train_loss': float(np.mean(self.epoch_losses or [np.nan])),
               f'{stage}/val_loss': ev['eval/loss'], f'{stage}/lr': self.last['lr'],
               'epoch': done / self.steps_per_epoch}
      self.epoch_losses = []
    self.log.write(done, ev, extra)
    self.last.update(ev)
    bar.write(f'{self.stage} step {done}: ' + ', '.join(
        f'{k}={v:.4f}' for k, v in ev.items() if not k[-1].isdigit()))
    return ev['eval/loss']

  def _is_sample_step(self, done: int) -> bool:
    """Every `sample.sample_every` epochs, and at the end (0 turns samples off)."""
    every = self.config.sample.sample_every
    if every <= 0 or self.config.sample.num_samples <= 0:
      return False
    return (done == self.total_steps
            or done % (every * self.steps_per_epoch) == 0)

  def _log_samples(self, done: int) -> None:
    """Reconstructions of validation windows (stage 1) or generations (stage 2):
    appended to <workdir>/samples.jsonl, and a wandb table when wandb is on."""
    n = self.config.sample.num_samples
    real = self.val_windows.get(np.arange(n) % self.val_windows.num_windows)
    tokens = jax.make_array_from_callback(real.shape, sharding.replicated(self.mesh),
                                          lambda index: real[index])
    key = jax.random.fold_in(jax.random.key(self.config.seed + 2), done)
    out = np.asarray(self.sample_step(self.state['params'], tokens, key,
                                      *self.frozen).addressable_data(0))
    if not self.is_main:
      return
    decode = lambda ids: self.tokenizer.decode(ids.tolist())
    if self.stage == 'vae':
      columns = ['step', 'input', 'reconstruction', 'token_accuracy']
      rows = [[done, decode(r), decode(o), float(np.mean(r == o))]
              for r, o in zip(real, out)]
    else:
      columns = ['step', 'generation']
      rows = [[done, decode(o)] for o in out]
    with (self.workdir / 'samples.jsonl').open('a') as f:
      for row in rows:
        f.write(json.dumps(dict(zip(columns, row))) + '\n')
    if self.log.wandb is not None:
      import wandb
      name = 'reconstructions' if self.stage == 'vae' else 'generations'
      self.log.wandb.log({f'{self.stage}/{name}': wandb.Table(columns=columns,
                                                              data=rows)}, step=done)

  def _wandb_batch_names(self, mean) -> dict[str, float]:
    """The original TokCom's wandb names for batch losses."""
    if 'loss' not in mean:
      return {}
    if self.stage == 'vae':
      return {'vae/batch_loss': mean['loss']}
    return {'diffusion/batch_ce_loss': mean['ce'],
            'diffusion/batch_mse_loss': mean['mse']}
