"""`load`: what train.py wrote in a workdir, as a `TokCom` or an `AutoregressiveLM`."""

from __future__ import annotations

from tokcom_jax import config_lib, stages
from tokcom_jax.data.tokenizer import load_tokenizer
from tokcom_jax.inference.autoregressive import AutoregressiveLM
from tokcom_jax.inference.tokcom import TokCom
from tokcom_jax.stages.vae import trained_config
from tokcom_jax.storage import checkpoint, portable
from tokcom_jax.training import sharding, train_state


def load(workdir: str, vae_workdir: str | None = None) -> TokCom | AutoregressiveLM:
  """Loads what train.py wrote in `workdir`: a TokCom (from a stage-2 run, or the
  VAE alone from a stage-1 run) or the autoregressive baseline (an `ar` run); its
  `step` is the checkpoint step read (the run's best, or its newest readable).

  A stage-2 run finds its VAE where it recorded it (relative to itself, so a moved
  or copied runs/ tree loads) or at `vae_workdir`, and refuses any VAE other than
  the checkpoint it was trained on (tokcom_jax.storage.portable)."""
  _, meta = checkpoint.read_meta(workdir)
  config = config_lib.from_dict(meta['config'])
  mesh = sharding.make_mesh(-1, 1)
  abstract = lambda stage: train_state.abstract_params(
      stages.get(config, stage).build, mesh)[1]
  step = None

  def restore(stage):
    nonlocal step
    params, _, step = checkpoint.restore_params(workdir, abstract(stage))
    return params

  model = _load(workdir, vae_workdir, meta, config, mesh, restore)
  model.step = step
  return model


def _load(workdir, vae_workdir, meta, config, mesh, restore):
  if meta['stage'] in ('ar', 'vae'):
    tokenizer = load_tokenizer(config.tokenizer, portable.tokenizer_dir(workdir, meta))
    if meta['stage'] == 'ar':
      return AutoregressiveLM(config, tokenizer, restore('ar'), workdir=str(workdir))
    return TokCom(config, tokenizer, restore('vae'), workdir=str(workdir))
  vae_dir, recorded = portable.find_frozen(workdir, meta, 'vae', vae_workdir)
  tokenizer = load_tokenizer(config.tokenizer,
                             portable.tokenizer_dir(workdir, meta, vae_dir))
  vae_config = trained_config(config, vae_dir)
  vae_params = portable.restore_frozen(
      workdir, 'vae', vae_dir, recorded,
      train_state.abstract_params(stages.get(vae_config, 'vae').build, mesh)[1])
  return TokCom(config, tokenizer, vae_params, restore(meta['stage']),
                workdir=str(workdir), vae_workdir=str(vae_dir), vae_config=vae_config)
