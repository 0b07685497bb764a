"""Declared ranges of every config field, checked in one place before any work starts.

A `Rule` says what a value may be; `CONFIG` gives one to every field of
`config_lib.base_config()` (a new field is one line here, and a test fails while a
field has none); the entry points' flags have their tables in `tokcom_jax.cli`. One
loop (`_check`) checks fields and flags alike; `check_config` then checks the fields
that must agree. A value out of range is a `ConfigError` of one line that names the
field, the value, what is allowed and how to fix it:

    train.batch_size=0: must be a positive integer (set --config.train.batch_size=N)
    --top_p=1.5: must be a number in (0, 1] (pass --top_p=P)
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, NamedTuple

from tokcom_jax.errors import ConfigError
from tokcom_jax.storage.files import is_remote


class Rule(NamedTuple):
  """`problem(value)`: None when the value is allowed, else what is wrong with it.
  `example` stands for a good value in the fix; None when the problem says the fix."""
  problem: Callable[[Any], str | None]
  example: str | None = 'N'


def rule(ok: Callable[[Any], bool], allowed: str, example: str = 'N') -> Rule:
  def problem(value):
    try:
      good = ok(value)
    except (TypeError, ValueError):
      good = False
    return None if good else f'must be {allowed}'
  return Rule(problem, example)


def _int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def one_of(*choices: str) -> Rule:
  return rule(lambda v: v in choices, 'one of ' + ', '.join(map(repr, choices)),
              choices[0])


POSITIVE_INT = rule(lambda v: _int(v) and v > 0, 'a positive integer')
COUNT = rule(lambda v: _int(v) and v >= 0, 'an integer >= 0')
# Random seeds become 32-bit keys (jax.random.key): a larger one would wrap around
# and silently give another seed's samples.
SEED = rule(lambda v: _int(v) and 0 <= v < 2**32, 'an integer in [0, 2**32 - 1]')
EVEN_INT = rule(lambda v: _int(v) and v > 0 and v % 2 == 0, 'an even positive integer')
MESH_AXIS = rule(lambda v: _int(v) and (v == -1 or v > 0),
                 'a positive integer, or -1 for the devices the other axis leaves')
POSITIVE = rule(lambda v: _number(v) and v > 0, 'a positive number', 'X')
NON_NEGATIVE = rule(lambda v: _number(v) and v >= 0, 'a number >= 0', 'X')
NUMBER = rule(_number, 'a finite number', 'X')
FRACTION = rule(lambda v: _number(v) and 0 <= v < 1, 'a number in [0, 1)', 'X')
PROBABILITY = rule(lambda v: _number(v) and 0 < v <= 1, 'a number in (0, 1]', 'P')
BOOL = rule(lambda v: isinstance(v, bool), 'true or false', 'true')
NAME = rule(lambda v: isinstance(v, str) and v.strip() != '', 'a non-empty string',
            'NAME')
ANY = Rule(lambda v: None)  # free text, or a value absl or the code after checks
# A byte-level BPE starts from 256 byte tokens and its special tokens: fewer than
# this learns no merge at all (no token longer than a byte).
MIN_BPE = 260
TOKENIZER = rule(
    lambda v: (v[4:].isdigit() and int(v[4:]) >= MIN_BPE) if v.startswith('bpe:')
    else v.strip() != '', f'bpe:<vocab size of at least {MIN_BPE}> or a tokenizer name'
    ' or path', 'bpe:8192')
SOURCE = rule(
    lambda v: v == 'stdlib' or (v.partition(':')[0] in ('files', 'hf', 'tfds')
                                and v.partition(':')[2] != ''),
    "'stdlib', 'files:<glob>', 'hf:<path>[:<name>]' or 'tfds:<name>'", 'stdlib')


# ------------------------------------------------------------------------- paths


def _existing_ancestor(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.lexists(path):
    path = os.path.dirname(path)
  return path


def directory_problem(what: str, path: str) -> str | None:
  """A directory that exists or can be created and written to."""
  if is_remote(path):
    return None
  if os.path.exists(path) and not os.path.isdir(path):
    return f'is a file, not a directory (remove it or choose another {what})'
  parent = _existing_ancestor(path)
  if not os.path.isdir(parent):
    return f'{parent} is a file, not a directory (choose another {what})'
  if not os.access(parent, os.W_OK | os.X_OK):
    return f'{parent} is not writable (check its permissions or choose another {what})'
  return None


CACHE_DIR = Rule(
    lambda v: None if v == '' else directory_problem('data.cache_dir', v), None)


# ------------------------------------------------------------------ config fields


def _section(name: str, rules: dict[str, Rule]) -> dict[str, Rule]:
  return {f'{name}.{field}': r for field, r in rules.items()}


_TRANSFORMER = dict(hidden_size=POSITIVE_INT, num_heads=POSITIVE_INT,
                    num_kv_heads=POSITIVE_INT, intermediate_size=POSITIVE_INT,
                    rope_theta=POSITIVE, rms_eps=POSITIVE)
_STAGE_LENGTH = dict(epochs=COUNT, num_steps=COUNT, lr=POSITIVE)

CONFIG: dict[str, Rule] = {
    'stage': one_of('vae', 'diffusion', 'ar', 'all', 'reflow'),
    'seed': SEED,
    'compute_dtype': one_of('bfloat16', 'float32'),
    'scan_layers': BOOL,
    'remat': one_of('none', 'dots_saveable', 'full'),
    'tokenizer': TOKENIZER,
    'vocab_size': POSITIVE_INT,
    'max_length': POSITIVE_INT,
    'chunk_size': POSITIVE_INT,
    'data.source': SOURCE,
    'data.text_column': NAME,
    'data.train_split': NAME,
    'data.val_split': NAME,
    'data.cache_dir': CACHE_DIR,  # '': the default cache
    **_section('vae', _TRANSFORMER),
    'vae.encoder_layers': POSITIVE_INT,
    'vae.decoder_layers': POSITIVE_INT,
    'vae.latent_dim': POSITIVE_INT,
    'vae.encoder_causal': BOOL,
    'vae.decoder_causal': BOOL,
    'vae.kl_weight': NON_NEGATIVE,
    'vae.kl_clamp': NON_NEGATIVE,
    'vae.latent_noise': NON_NEGATIVE,
    'vae.latent_dropout': FRACTION,
    'vae.token_dropout': FRACTION,
    'vae.normalize_latent': BOOL,
    'vae.autoregressive_decoder': BOOL,
    'vae.prior_weight': NON_NEGATIVE,
    **_section('dit', _TRANSFORMER),
    'dit.num_layers': POSITIVE_INT,
    'dit.time_freq_dim': EVEN_INT,  # half cosines, half sines
    'flow.noise_std': POSITIVE,
    'flow.t_schedule': one_of('uniform', 'logit_normal'),
    'flow.t_mean': NUMBER,
    'flow.t_std': POSITIVE,
    'flow.t_shift': POSITIVE,
    'flow.sample_shift': POSITIVE,
    'flow.ce_weight': NON_NEGATIVE,
    'flow.ce_min_t': FRACTION,
    'flow.mse_weight': NON_NEGATIVE,
    'flow.standardize': BOOL,
    'flow.self_condition': BOOL,
    'flow.order': one_of('parallel', 'chunkwise', 'head'),
    'head.kind': one_of('flow', 'energy'),
    'head.width': POSITIVE_INT,
    'head.blocks': COUNT,
    'head.batch_mul': POSITIVE_INT,
    'head.predict': one_of('x1', 'velocity'),
    'head.input': one_of('tokens', 'latent'),
    'head.token_loss': NON_NEGATIVE,
    'head.condition': one_of('joint', 'separate'),
    'head.shortcut_from': rule(lambda v: _int(v) and (v == 0 or v >= 2 and not v & v - 1),
                               '0 or a power of 2 >= 2'),
    'sample.noise_scale': POSITIVE,
    'vae_workdir': NAME,  # read (and checked) when stage 2 starts
    'reflow.teacher_steps': POSITIVE_INT,
    'reflow.max_steps': POSITIVE_INT,
    'reflow.batch_mul': POSITIVE_INT,
    'teacher_workdir': ANY,  # set by stage 2, read (and checked) when reflow starts
    **_section('ar', _TRANSFORMER),
    'ar.num_layers': POSITIVE_INT,
    'ar.tie_embeddings': BOOL,
    'train.batch_size': POSITIVE_INT,
    'train.grad_accum': POSITIVE_INT,
    'train.warmup_steps': COUNT,
    'train.weight_decay': NON_NEGATIVE,
    'train.grad_clip': POSITIVE,
    'train.b1': FRACTION,
    'train.b2': FRACTION,
    'train.log_every': POSITIVE_INT,
    'train.eval_every': COUNT,  # 0: once an epoch
    'train.eval_batches': POSITIVE_INT,  # every run evaluates (the best checkpoint)
    'train.checkpoint_every': COUNT,  # 0: at evaluations only
    'train.keep_checkpoints': POSITIVE_INT,
    'train.max_nan_steps': POSITIVE_INT,
    **_section('train.vae', _STAGE_LENGTH),  # num_steps 0: epochs decide
    **_section('train.diffusion', _STAGE_LENGTH),
    **_section('train.ar', _STAGE_LENGTH),
    **_section('train.reflow', _STAGE_LENGTH),  # 0 steps, 0 epochs: no reflow
    'sample.steps': POSITIVE_INT,
    'sample.num_samples': COUNT,  # 0: no samples
    'sample.sample_every': COUNT,  # 0: no samples
    'mesh.data': MESH_AXIS,
    'mesh.fsdp': MESH_AXIS,
    'wandb.project': NAME,
    'wandb.mode': one_of('disabled', 'online', 'offline'),
}

_MISSING = object()


def _get(config, path: str):
  node = config
  for key in path.split('.'):
    if key not in node:
      return _MISSING
    node = node[key]
  return node


def _check(get: Callable[[str], Any], rules: dict[str, Rule], flags: bool) -> None:
  """Every value `get(name)` gives (not missing, not None) against its rule: a config
  field's fix is `--config.<path>=…`, a flag's `--<name>=…`."""
  for name, r in rules.items():
    value = get(name)
    if value is _MISSING or value is None:
      continue
    problem = r.problem(value)
    if problem:
      shown = f'--{name}={value}' if flags else (
          f'{name}={value!r}' if isinstance(value, str) else f'{name}={value}')
      fix = (f' ({"pass --" if flags else "set --config."}{name}={r.example})'
             if r.example else '')
      raise ConfigError(f'{shown}: {problem}{fix}')


def check_config(config) -> None:
  """Every field against its rule, then the fields that must agree; raises
  ConfigError, one line, at the first problem."""
  _check(lambda path: _get(config, path), CONFIG, flags=False)
  _check_combinations(config)


def check_flags(values: dict[str, Any], rules: dict[str, Rule]) -> None:
  """The flags in `rules` (absent or None: not given) against their rules."""
  _check(values.get, rules, flags=True)


def _fail(fields: str, problem: str, fix: str):
  raise ConfigError(f'{fields}: {problem} (set --config.{fix})')


def check_mesh_axes(data: int, fsdp: int) -> None:
  """The rule of `config.mesh` that needs no device count (`sharding.mesh_shape`
  checks the rest where the devices are known)."""
  if data == -1 and fsdp == -1:
    _fail('mesh.data=-1, mesh.fsdp=-1', 'at most one axis can be -1', 'mesh.fsdp=1')


def _check_combinations(c) -> None:
  L, K = c.max_length, c.chunk_size
  if L % K:
    _fail(f'max_length={L}', f'is not divisible by chunk_size {K}',
          f'max_length={max(L // K, 1) * K}')
  for name in ('vae', 'dit', 'ar'):
    m = c[name]
    D, H, KV = m.hidden_size, m.num_heads, m.num_kv_heads
    if D % H or (D // H) % 2:
      problem = (f'is not divisible by {name}.num_heads {H}' if D % H else
                 f'gives an odd head size {D // H}: rotary embeddings need an even one')
      _fail(f'{name}.hidden_size={D}', problem,
            f'{name}.hidden_size={max(D // (2 * H), 1) * 2 * H}')
    if H % KV:
      divisor = max(d for d in range(1, KV + 1) if H % d == 0)
      _fail(f'{name}.num_heads={H}', f'is not divisible by {name}.num_kv_heads {KV}',
            f'{name}.num_kv_heads={divisor}')
  check_mesh_axes(c.mesh.data, c.mesh.fsdp)
  if c.tokenizer.startswith('bpe:') and int(c.tokenizer[4:]) > c.vocab_size:
    # Known before any work: the BPE would be trained (minutes, gigabytes) and then
    # refused for having more tokens than the embedding has rows.
    _fail(f'tokenizer={c.tokenizer}, vocab_size={c.vocab_size}',
          'the BPE would have more tokens than the embeddings have rows',
          f'vocab_size={c.tokenizer[4:]}, or a smaller bpe:N')
  if c.vae.autoregressive_decoder and not c.vae.decoder_causal:
    _fail('vae.autoregressive_decoder=True, vae.decoder_causal=False',
          "a token must not see its chunk's later tokens", 'vae.decoder_causal=True')
  if c.vae.prior_weight > 0 and not c.vae.normalize_latent:
    _fail(f'vae.prior_weight={c.vae.prior_weight}, vae.normalize_latent=False',
          'the latent prior would shrink unnormalized latents toward zero',
          'vae.normalize_latent=True')
  if not (c.flow.ce_weight > 0 or c.flow.mse_weight > 0):
    _fail(f'flow.ce_weight={c.flow.ce_weight}, flow.mse_weight={c.flow.mse_weight}',
          'stage 2 would learn nothing', 'flow.mse_weight=1')
  if c.flow.order == 'head' and c.head.kind == 'energy' and c.head.batch_mul < 2:
    _fail(f'head.kind=energy, head.batch_mul={c.head.batch_mul}',
          'the energy score compares at least 2 samples per position',
          'head.batch_mul=8')
  if c.flow.order == 'head' and c.head.shortcut_from and (
      c.head.kind != 'flow' or c.head.predict != 'x1' or c.flow.self_condition):
    _fail(f'head.shortcut_from={c.head.shortcut_from}',
          'shortcuts are learned by a flow head predicting x1 without'
          ' self-conditioning', 'head.shortcut_from=0')
  for stage in ('vae', 'diffusion') if c.stage == 'all' else (c.stage,):
    s = c.train[stage]
    if s.num_steps == 0 and s.epochs == 0:
      _fail(f'train.{stage}.num_steps=0, train.{stage}.epochs=0',
            'there is nothing to train', f'train.{stage}.num_steps=N')
