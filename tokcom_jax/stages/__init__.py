"""The stages of TokCom, by the name a config's `stage` field gives them."""

from __future__ import annotations

from tokcom_jax.errors import ConfigError
from tokcom_jax.stages.ar import ARStage
from tokcom_jax.stages.base import Stage
from tokcom_jax.stages.flow import FlowStage
from tokcom_jax.stages.vae import VAEStage

REGISTRY: dict[str, type[Stage]] = {s.name: s for s in (VAEStage, FlowStage, ARStage)}


def get(config, name: str | None = None) -> Stage:
  """The stage `name` (default: `config.stage`) of a config."""
  name = name or config.stage
  if name not in REGISTRY:
    raise ConfigError(f'stage {name!r}: use one of {sorted(REGISTRY)}.')
  return REGISTRY[name](config)
