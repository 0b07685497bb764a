"""A micro config and corpus for end-to-end training tests (seconds on a CPU)."""

import pathlib
import sysconfig

from configs import tiny
from tokcom_jax import config_checks, config_lib


def make_corpus(root: pathlib.Path, files: int = 40) -> str:
  """A `files:` source of real Python code: a slice of the standard library."""
  root.mkdir(parents=True, exist_ok=True)
  stdlib = pathlib.Path(sysconfig.get_paths()['stdlib'])
  for i, path in enumerate(sorted(stdlib.glob('*.py'))[:files]):
    (root / f'{i:03d}_{path.name}.txt').write_text(path.read_text(encoding='utf-8'))
  return f'files:{root}/*.txt'


def small_corpus(root: pathlib.Path, texts: list[str]):
  """(`files:` source, a 300-token BPE trained on it): one document per text."""
  from tokcom_jax.data import sources, tokenizer
  root.mkdir(parents=True)
  for i, text in enumerate(texts):
    (root / f'doc{i}.txt').write_text(text)
  source = f'files:{root}/*.txt'
  return source, tokenizer.train_bpe(sources.iter_documents(source, 'train'), 300)


def micro_config(source: str, cache_dir: str, stage: str = 'vae', **modifiers):
  mods = dict(MICRO)
  mods.update(modifiers)
  arg = ','.join([stage] + [f'{k}={v}' for k, v in mods.items()])
  config = tiny.get_config(arg)
  config.unlock()
  config.data.source = source
  config.data.cache_dir = cache_dir
  config.lock()
  config_checks.check_config(config)
  return config


MICRO = dict(
    tokenizer='bpe:384', vocab_size=384, max_length=32, batch_size=8,
    **{'vae.hidden_size': 32, 'vae.encoder_layers': 1, 'vae.decoder_layers': 1,
       'vae.num_heads': 2, 'vae.num_kv_heads': 1, 'vae.intermediate_size': 64,
       'vae.latent_dim': 8, 'dit.hidden_size': 32, 'dit.num_layers': 1,
       'dit.num_heads': 2, 'dit.num_kv_heads': 1, 'dit.intermediate_size': 64,
       'dit.time_freq_dim': 32, 'train.vae.num_steps': 8,
       'train.diffusion.num_steps': 8, 'log_every': 1, 'eval_every': 4,
       'eval_batches': 2, 'warmup_steps': 2,
       # Micro runs must reconstruct within a few hundred steps: no latent noise;
       # and no latent prior (tests/test_prior.py trains one end to end).
       'vae.latent_noise': 0.0, 'vae.prior_weight': 0.0,
       # The DiT's chunkwise recipe, which most sampling tests are about (the chunk
       # generator's runs: tests/test_generator.py).
       'flow.order': 'chunkwise', 'flow.self_condition': True,
       'sample.noise_scale': 0.5, 'sample.steps': 50,
       # No reflow phase (a flow head's; tests/test_generator.py trains one).
       'train.reflow.num_steps': 0})


def micro_flags(source: str, cache_dir: str, stage: str = 'vae', **modifiers
                ) -> list[str]:
  """train.py flags for the same run as micro_config(source, cache_dir, …)."""
  base = tiny.get_config(stage)
  mods = {**MICRO, **modifiers, 'data.source': source, 'data.cache_dir': cache_dir}
  return [f'--config={pathlib.Path(tiny.__file__)}:{stage}'] + [
      f'--config.{config_lib._resolve(base, k)}={v}' for k, v in mods.items()]


def train_sampling_runs(root: pathlib.Path) -> tuple[str, str]:
  """A micro VAE trained until it reconstructs (latent_dim 16), and a short stage-2
  run on it, on a small repetitive corpus: about 30 s on 2 cores."""
  from tokcom_jax.training import trainer as trainer_lib
  (root / 'text').mkdir(parents=True)
  lines = ['import os\nimport sys\n\n\ndef main():\n    return 0\n',
           'class Point:\n    x = 1\n    y = 2\n']
  for i in range(8):  # small and repetitive: a micro VAE learns it in seconds
    (root / 'text' / f'{i}.txt').write_text((lines[i % 2] + f'# {i}\n') * 60)
  source = f'files:{root}/text/*.txt'
  cache = str(root / 'cache')
  vae_dir, dit_dir = str(root / 'vae'), str(root / 'diffusion')
  # No end-of-run samples: what the tests sample from these runs, they sample.
  trainer_lib.Trainer(micro_config(
      source, cache, **{'train.vae.num_steps': 800, 'train.vae.lr': 3e-3,
                        'log_every': 200, 'eval_every': 800, 'vae.hidden_size': 64,
                        'vae.latent_dim': 16, 'dit.hidden_size': 32,
                        'sample_every': 0}), vae_dir).run()
  trainer_lib.Trainer(micro_config(
      source, cache, stage='diffusion', vae_workdir=vae_dir,
      **{'vae.hidden_size': 64, 'vae.latent_dim': 16, 'sample_every': 0}),
      dit_dir).run()
  return vae_dir, dit_dir


def train_ar_run(runs: tuple[str, str]) -> str:
  """A micro autoregressive run beside the sampling runs (same corpus and cache), so
  that `evaluate` finds it as the reference of the diffusion run."""
  from tokcom_jax.training import trainer as trainer_lib
  root = pathlib.Path(runs[1]).parent
  ar_dir = str(root / 'ar')
  trainer_lib.Trainer(micro_config(
      f'files:{root}/text/*.txt', str(root / 'cache'), stage='ar',
      **{'train.ar.num_steps': 200, 'train.ar.lr': 3e-3, 'log_every': 100,
         'eval_every': 200, 'sample_every': 1000, 'ar.hidden_size': 32, 'ar.num_layers': 1,
         'ar.num_heads': 2, 'ar.num_kv_heads': 1, 'ar.intermediate_size': 64}),
      ar_dir).run()
  return ar_dir


def train_head_run(runs: tuple[str, str]) -> str:
  """A micro chunk-generator stage 2 (teacher, then reflow) beside the sampling runs."""
  from tokcom_jax.training import trainer as trainer_lib
  vae_dir, dit_dir = runs
  root = pathlib.Path(dit_dir).parent
  workdir = str(root / 'head')
  trainer_lib.train(micro_config(
      f'files:{root}/text/*.txt', str(root / 'cache'), stage='diffusion',
      vae_workdir=vae_dir, **{'vae.hidden_size': 64, 'vae.latent_dim': 16,
                              'sample_every': 0, 'flow.order': 'head',
                              'head.token_loss': 0.5, 'head.width': 32,
                              'train.diffusion.num_steps': 8, 'eval_every': 8,
                              # its teacher in <workdir>/teacher, then reflow
                              'train.reflow.num_steps': 4, 'reflow.teacher_steps': 3,
                              'sample.steps': 2}),
      workdir)
  return workdir
