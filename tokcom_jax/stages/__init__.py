"""The stages of TokCom, by the name a config's `stage` field gives them."""

from __future__ import annotations

import os

import ml_collections

from tokcom_jax.errors import ConfigError
from tokcom_jax.stages.ar import ARStage
from tokcom_jax.stages.base import Stage
from tokcom_jax.stages.flow import FlowStage
from tokcom_jax.stages import reflow
from tokcom_jax.stages.reflow import ReflowStage
from tokcom_jax.stages.vae import VAEStage

REGISTRY: dict[str, type[Stage]] = {s.name: s for s in (VAEStage, FlowStage, ARStage,
                                                        ReflowStage)}
__all__ = ['REGISTRY', 'Stage', 'get', 'phases']


def get(config, name: str | None = None) -> Stage:
  """The stage `name` (default: `config.stage`) of a config."""
  name = name or config.stage
  if name not in REGISTRY:
    raise ConfigError(f'stage {name!r}: use one of {sorted(REGISTRY)}.')
  return REGISTRY[name](config)


def phases(config, workdir: str) -> list[tuple[ml_collections.ConfigDict, str]]:
  """The runs `train.py` makes for `config.stage` in `workdir`, in order, as
  (config, workdir): 'all' is the VAE's run in <workdir>/vae, then stage 2's in
  <workdir>/diffusion; stage 2 with reflow its teacher's run, then its own
  (`reflow.phases`); any other stage one run."""
  if config.stage != 'all':
    return reflow.phases(config, workdir)
  vae_dir = os.path.join(workdir, 'vae')
  with_fields = lambda **fields: ml_collections.ConfigDict(
      {**config.to_dict(), **fields}).lock()
  return [(with_fields(stage='vae'), vae_dir),
          (with_fields(stage='diffusion', vae_workdir=vae_dir),
           os.path.join(workdir, 'diffusion'))]
