"""Stage 1: the chunk VAE learns to turn every K tokens into one latent and back
(and, with `vae.prior_weight`, to make its latents predictable by a flow prior)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tokcom_jax import config_lib
from tokcom_jax.errors import ConfigError
from tokcom_jax.models import flops, flow, generator, vae
from tokcom_jax.stages.base import Stage
from tokcom_jax.storage import checkpoint


PRIOR_EVAL_KEY = 1234  # evaluation draws the prior's noise and times from this key


def trained_config(config, vae_workdir):
  """The config a frozen VAE is built with: the one its run at `vae_workdir` was
  trained with (its latent prior, if any, follows that run's generator settings,
  whatever stage 2's are), or `config` when that run has no checkpoint yet. The
  latent size must agree: stage 2 is built on it."""
  if not vae_workdir or not checkpoint.checkpoint_dir(vae_workdir).exists():
    return config
  try:
    meta = checkpoint.read_meta(vae_workdir)[1]
    trained = config_lib.from_dict(meta['config'])
  except Exception:  # unreadable: the restore that follows says why
    return config
  stage = meta.get('stage', trained.stage)
  if stage != 'vae':
    raise ConfigError(
        f'vae_workdir={vae_workdir} is a {stage!r} run, not a VAE: point'
        ' --config.vae_workdir at a stage-1 run (train.py --config …:vae).')
  if trained.vae.latent_dim != config.vae.latent_dim:
    raise ConfigError(
        f'vae.latent_dim={config.vae.latent_dim}: the VAE at {vae_workdir} has latents'
        f' of {trained.vae.latent_dim} (set --config.vae.latent_dim='
        f'{trained.vae.latent_dim}, or train a VAE with this size)')
  return trained


class VAEStage(Stage):
  name = 'vae'
  sample_columns = ('step', 'input', 'reconstruction', 'token_accuracy')
  sample_table = 'vae/reconstructions'

  def build(self, rngs):
    return vae.ChunkVAE(vae.VAEConfig.from_config(self.config), rngs=rngs)

  def loss(self, model, frozen, tokens_BL, rng):
    prior_loss = None
    if model.cfg.prior is not None:
      # The prior's flow-matching MSE on the latent means, as stage 2 computes it
      # (the run's flow recipe) but with gradients into the encoder through both the
      # noised input and the target: latents move to where the prior predicts them.
      flow_cfg = flow.FlowConfig.from_config(self.config)
      key = jax.random.key(PRIOR_EVAL_KEY) if rng is None else jax.random.fold_in(rng, 3)

      def prior_loss(mean_BNZ):
        if isinstance(model.prior, generator.ChunkGenerator):  # its whole loss
          return generator.loss_fn(model.prior, tokens_BL, mean_BNZ, key, flow_cfg)[0]
        pred_BNZ, _ = flow.noised_prediction(model.prior, mean_BNZ, key, flow_cfg)
        return jnp.mean(jnp.square(pred_BNZ - mean_BNZ))
    return vae.loss_fn(model, tokens_BL, jnp.ones_like(tokens_BL), rng, prior_loss)

  def sample(self, model, frozen, tokens_BL, key):
    """Reconstructions of the windows through their latent means."""
    return jnp.argmax(model.decode(model.encode(tokens_BL)[0]), axis=-1)

  def sample_rows(self, real_BL, out_BL, decode):
    return [{'input': decode(r), 'reconstruction': decode(o),
             'token_accuracy': float(np.mean(r == o))} for r, o in zip(real_BL, out_BL)]

  def train_flops(self, batch):
    forward = flops.vae_forward(self.config, batch)
    prior = 0
    if self.config.vae.prior_weight > 0 and self.config.flow.order == 'head':
      prior = 3 * flops.generator_forward(self.config, batch)
    elif self.config.vae.prior_weight > 0:  # forward + backward, one more: estimate
      prior = (3 + self.config.flow.self_condition) * flops.dit_forward(self.config, batch)
    return 3 * (forward['encoder'] + forward['decoder']) + prior
