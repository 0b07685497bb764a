"""Config helpers: the full set of fields, big_vision-style arguments, validation.

A config file's `get_config(arg)` takes `arg` = `<stage>[,<field>=<value>...]`, e.g.
`vae,batch_size=16,vae.encoder_layers=6`. A modifier names a field by its dotted path
or, when the name is unique in the config, by its last component alone.
"""

from __future__ import annotations

import ml_collections

from tokcom_jax import config_checks
from tokcom_jax.errors import ConfigError


STAGES = ('vae', 'diffusion', 'ar')  # each has a file in tokcom_jax/stages/


# Generation recipes a config can switch to with one `recipe=<name>` modifier.
RECIPES = {
    # The original TokCom v5.2: raw latents, tiny noise, uniform t, CE + MSE.
    'v52': dict(
        flow=dict(noise_std=0.05, t_schedule='uniform', t_shift=1.0, sample_shift=1.0,
                  ce_weight=1.0, ce_min_t=0.0, mse_weight=1.0, standardize=False,
                  self_condition=False, order='parallel'),
        vae=dict(latent_noise=0.0, latent_dropout=0.0, token_dropout=0.0,
                 normalize_latent=False, autoregressive_decoder=False,
                 prior_weight=0.0),
        sample=dict(noise_scale=1.0, steps=50)),
}


def base_config() -> ml_collections.ConfigDict:
  """Every field tokcom_jax reads, with the v5.2 values where the original has one."""
  c = ml_collections.ConfigDict()
  c.stage = 'vae'
  c.seed = 0
  c.compute_dtype = 'bfloat16'  # parameters and optimizer state stay fp32
  # Every transformer stack: stacked layers under one lax.scan (compile time flat in
  # depth), and what the backward pass recomputes ('none' / 'dots_saveable' / 'full').
  c.scan_layers = True
  c.remat = 'none'

  # Text.
  c.tokenizer = 'meta-llama/CodeLlama-7b-hf'
  c.vocab_size = 32016  # embedding rows; must be >= the tokenizer's size
  c.max_length = 1024
  c.chunk_size = 4
  c.data = ml_collections.ConfigDict(dict(
      source='hf:wikitext:wikitext-2-raw-v1', text_column='text',
      train_split='train', val_split='validation', cache_dir=''))

  # Stage 1: chunk VAE. "24 layers" is split 12 encoder + 12 decoder: see configs/v52.py.
  c.vae = ml_collections.ConfigDict(dict(
      hidden_size=896, encoder_layers=12, decoder_layers=12, num_heads=14,
      num_kv_heads=2, intermediate_size=4864, latent_dim=896,
      rope_theta=1_000_000.0, rms_eps=1e-6, encoder_causal=True,
      decoder_causal=True, kl_weight=0.0, kl_clamp=0.0, latent_noise=0.0,
      latent_dropout=0.0, token_dropout=0.0, normalize_latent=False,
      autoregressive_decoder=False, prior_weight=0.0))

  # Stage 2: latent flow transformer.
  c.dit = ml_collections.ConfigDict(dict(
      hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
      intermediate_size=4864, rope_theta=10_000.0, rms_eps=1e-6,
      time_freq_dim=256))
  c.flow = ml_collections.ConfigDict(dict(
      noise_std=0.05, t_schedule='uniform', t_mean=0.0, t_std=1.0, t_shift=1.0,
      sample_shift=1.0, ce_weight=1.0, ce_min_t=0.0, mse_weight=1.0, standardize=False,
      self_condition=False, order='parallel'))
  # The chunk generator's head (flow.order='head'; tokcom_jax/models/generator.py):
  # a flow head (MAR's) or an energy head (CALM's) of `blocks` residual MLP blocks of
  # `width`, `batch_mul` draws per trunk position in training, predicting x1 or the
  # velocity; the trunk reads the previous chunk's 'tokens' or 'latent'; token_loss
  # weighs the trunk's next-chunk token cross-entropy; condition: how the flow
  # head's modulations read (t, state): 'joint' or 'separate' (models/head.py);
  # shortcut_from: S > 0 (a power of 2) teaches the head steps of 2/S … 1 from its
  # own steps of 1/S, so that it samples in S/2, …, 2, 1 steps (models/head.py).
  c.head = ml_collections.ConfigDict(dict(
      kind='flow', width=256, blocks=3, batch_mul=4, predict='x1', input='tokens',
      token_loss=0.0, condition='joint', shortcut_from=0))
  c.vae_workdir = 'runs/v52/vae'  # where stage 2 finds the trained stage-1 VAE
  # Reflow of the chunk generator's flow head (tokcom_jax/stages/reflow.py): with
  # train.reflow.num_steps > 0 and a flow head (flow.order='head'), stage 2 trains
  # the generator into <workdir>/teacher, then a copy of it whose head learns to land
  # in 1 to `max_steps` Euler steps where the teacher's head lands in
  # `teacher_steps` from the same starting noise (of the sampler's scale,
  # sample.noise_scale), the trunk frozen, `batch_mul` draws per position: the run
  # in <workdir> samples in a few steps.
  c.reflow = ml_collections.ConfigDict(dict(teacher_steps=16, max_steps=4, batch_mul=4))
  c.teacher_workdir = ''  # set by stage 2 for its reflow phase

  # The autoregressive baseline: a causal Qwen2-0.5B-shaped LM on the same windows.
  c.ar = ml_collections.ConfigDict(dict(
      hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
      intermediate_size=4864, rope_theta=1_000_000.0, rms_eps=1e-6,
      tie_embeddings=True))

  # Optimisation. Per-stage length and learning rate; the rest is shared.
  c.train = ml_collections.ConfigDict(dict(
      batch_size=8, grad_accum=1, warmup_steps=100, weight_decay=0.01,
      grad_clip=1.0, b1=0.9, b2=0.95, log_every=10, eval_every=0,
      eval_batches=16, checkpoint_every=0, keep_checkpoints=3,
      max_nan_steps=5,
      vae=dict(epochs=5, num_steps=0, lr=1e-4),
      diffusion=dict(epochs=10, num_steps=0, lr=3e-5),
      ar=dict(epochs=10, num_steps=0, lr=1e-4),
      reflow=dict(epochs=0, num_steps=0, lr=3e-4)))

  # noise_scale: the sampler starts from noise of noise_scale × flow.noise_std (< 1:
  # samples nearer the modes, less diverse; a latent temperature).
  c.sample = ml_collections.ConfigDict(dict(steps=50, num_samples=2, sample_every=1,
                                            noise_scale=1.0))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.wandb = ml_collections.ConfigDict(dict(project='TokCom-v5.2', mode='disabled'))
  return c


# Fields whose default differs from what the code did before they existed: a run
# saved without the field is read with the old behaviour, so its checkpoints load.
LEGACY_DEFAULTS = {'scan_layers': False}


def from_dict(saved: dict) -> ml_collections.ConfigDict:
  """A run's saved config, on top of every field's default, locked: a run written
  before a field existed reads it as its default (the recipe it was trained with),
  or as `LEGACY_DEFAULTS` says where the default changed since."""
  config = base_config()
  for key, value in LEGACY_DEFAULTS.items():  # what a run saved before key existed had
    if key not in saved:
      config[key] = value

  def merge(node, values):
    for key, value in values.items():
      if isinstance(value, dict) and isinstance(node.get(key), ml_collections.ConfigDict):
        merge(node[key], value)
      else:
        node[key] = value
  merge(config, saved)
  config.lock()
  return config


def _leaf_paths(config, prefix=''):
  for key, value in config.items():
    path = f'{prefix}{key}'
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaf_paths(value, path + '.')
    else:
      yield path


def _resolve(config, name: str) -> str:
  paths = list(_leaf_paths(config))
  if name in paths:
    return name
  matches = [p for p in paths if p.rsplit('.', 1)[-1] == name]
  if len(matches) == 1:
    return matches[0]
  if matches:
    raise ConfigError(f'config field {name!r} is ambiguous: write one of {matches}.')
  raise ConfigError(f'unknown config field {name!r}: see tokcom_jax/config_lib.py'
                    ' for the fields a config has.')


def _cast(raw: str, like, path: str):
  try:
    if isinstance(like, bool):
      if raw.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(raw)
      return raw.lower() in ('true', '1')
    return type(like)(raw) if like is not None else raw
  except ValueError:
    raise ConfigError(f'{path}={raw!r}: expected a {type(like).__name__}.') from None


def parse_arg(arg: str | None, stages=STAGES, default: str = 'vae'
              ) -> tuple[str, dict[str, str]]:
  """'vae,batch_size=16' → ('vae', {'batch_size': '16'})."""
  parts = [p.strip() for p in (arg or default).split(',') if p.strip()]
  stage, modifiers = default, {}
  for part in parts:
    if '=' in part:
      key, value = part.split('=', 1)
      modifiers[key.strip()] = value.strip()
    elif part in stages:
      stage = part
    else:
      raise ConfigError(f'unknown config argument {part!r}: use one of {list(stages)}'
                        ', optionally followed by ,field=value modifiers.')
  return stage, modifiers


def apply_modifiers(config: ml_collections.ConfigDict, modifiers: dict[str, str]):
  for name, raw in modifiers.items():
    path = _resolve(config, name)
    *parents, leaf = path.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = _cast(raw, node[leaf], path)
  return config


def finalize(config: ml_collections.ConfigDict, arg: str | None,
             stages=STAGES) -> ml_collections.ConfigDict:
  """The common end of every get_config: stage and modifiers from `arg`, checked."""
  stage, modifiers = parse_arg(arg, stages)
  config.stage = stage
  if 'recipe' in modifiers:  # first, so that other modifiers can refine it
    name = modifiers.pop('recipe')
    if name not in RECIPES:
      raise ConfigError(f'recipe={name!r}: use one of {sorted(RECIPES)}.')
    config.flow.update(RECIPES[name]['flow'])
    config.vae.update(RECIPES[name]['vae'])
    config.sample.update(RECIPES[name]['sample'])
  apply_modifiers(config, modifiers)
  config_checks.check_config(config)
  config.lock()
  return config


def config_files(argv) -> list[str]:
  """The config files named by `--config=FILE[:ARG]` / `--config FILE[:ARG]`."""
  out = []
  for i, a in enumerate(argv):
    value = (a.split('=', 1)[1] if a.startswith('--config=') else
             argv[i + 1] if a == '--config' and i + 1 < len(argv) else None)
    if value:
      out.append(value.split(':', 1)[0])
  return out


def check_config_file(path: str) -> None:
  """A config file that Python can read and that defines `get_config`, checked
  before absl runs it (its SyntaxError or AttributeError would be a traceback)."""
  import ast
  try:
    source = open(path, encoding='utf-8').read()
  except (OSError, UnicodeDecodeError):
    return  # absl says the file cannot be read, in one line
  try:
    tree = ast.parse(source, filename=path)
  except SyntaxError as e:
    raise ConfigError(f'{path}, line {e.lineno}: {e.msg} (fix the config file)'
                      ) from None
  if not any(isinstance(node, ast.FunctionDef) and node.name == 'get_config'
             or isinstance(node, (ast.Import, ast.ImportFrom, ast.Assign))
             and 'get_config' in ast.dump(node)
             for node in tree.body):
    raise ConfigError(f'{path} defines no get_config(arg): a config file returns its'
                      ' config from get_config (see configs/tiny.py).')
