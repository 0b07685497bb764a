"""Stage 2: the generator learns a sequence's latents, reading the stage-1 VAE frozen
(its encoder gives x1, its decoder scores x1_pred): the latent flow transformer
(`flow.order` 'parallel' or 'chunkwise'), or the chunk generator, a trunk and a small
head (`flow.order = 'head'`)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from tokcom_jax.models import dit, flops, flow, generator, samplers, token_metrics
from tokcom_jax.stages.base import FrozenModel, Stage
from tokcom_jax.stages.vae import VAEStage, trained_config


EVAL_TIMES = (0.1, 0.5, 0.9)  # t values at which the flow model is evaluated
STATS_BATCHES = 32  # training batches that measure the latents' statistics


class FlowStage(Stage):
  name = 'diffusion'

  def __init__(self, config):
    super().__init__(config)
    self.flow = flow.FlowConfig.from_config(config)
    self.head = self.flow.order == 'head'

  def build(self, rngs):
    if self.head:
      return generator.ChunkGenerator(generator.GeneratorConfig.from_config(
          self.config), rngs=rngs)
    return dit.LatentFlowTransformer(dit.DiTConfig.from_config(self.config), rngs=rngs)

  def frozen(self):
    vae_config = trained_config(self.config, self.config.vae_workdir)
    return {'vae': FrozenModel(
        build=VAEStage(vae_config).build, workdir=self.config.vae_workdir,
        missing_hint='stage 2 needs a trained VAE: run stage 1 first (train.py'
                     ' --config …:vae), or set --config.vae_workdir.')}

  def tokenizer_dir(self, workdir):
    return VAEStage(self.config).tokenizer_dir(self.config.vae_workdir)

  def loss(self, model, frozen, tokens_BL, rng, t_B=None):
    if self.head:
      return self._head_loss(model, frozen, tokens_BL, rng,
                             decoder=self.flow.ce_weight > 0)
    return flow.diffusion_loss_fn(model, frozen['vae'], tokens_BL,
                                  jnp.ones_like(tokens_BL), rng, self.flow, t_B)

  def _head_loss(self, model, frozen, tokens_BL, rng, *, decoder, **kwargs):
    vae_model = frozen['vae']
    x1_BNZ = model.to_flow(jax.lax.stop_gradient(vae_model.encode(tokens_BL)[0]))

    def decoded_metrics(x_BNZ, tokens):
      logits = vae_model.decode(model.to_latent(x_BNZ), tokens)
      return token_metrics.reconstruction_metrics(
          logits, tokens, jnp.ones_like(tokens), self.config.chunk_size)
    return generator.loss_fn(model, tokens_BL, x1_BNZ, rng, self.flow,
                             decoded_metrics=decoded_metrics if decoder else None,
                             **kwargs)

  def _head_eval(self, model, frozen, tokens_BL, key):
    """The chunk generator's metrics: as `eval_metrics`, and how much the head
    uses its context: the MSE with another window's trunk states
    (`mse_other_context`) beside the MSE with the window's own."""
    vae_model = frozen['vae']
    x1_BNZ = model.to_flow(vae_model.encode(tokens_BL)[0])
    other_BND = jnp.roll(model.states(tokens_BL, x1_BNZ), 1, axis=0)
    times = (None,) if model.cfg.head.kind == 'energy' else EVAL_TIMES
    out, own, other = {}, [], []
    for i, t in enumerate(times):
      k = jax.random.fold_in(key, i)
      _, m = self._head_loss(model, frozen, tokens_BL, k, decoder=True, t=t)
      _, m_other = self._head_loss(model, frozen, tokens_BL, k, decoder=False, t=t,
                                   states_BND=other_BND)
      own.append(m)
      other.append(m_other['mse'])
      if t is not None:
        out.update({f'ce_t{t}': m['ce'], f'mse_t{t}': m['mse'],
                    f'token_accuracy_t{t}': m['token_accuracy']})
    for name in ('ce', 'mse', 'token_accuracy', 'next_chunk_ce',
                 'next_chunk_accuracy', 'energy'):
      if name in own[0]:
        out[name] = jnp.mean(jnp.stack([m[name] for m in own]))
    out['mse_other_context'] = jnp.mean(jnp.stack(other))
    out['loss'] = self.flow.ce_weight * out['ce'] + self.flow.mse_weight * out['mse']
    return out

  def eval_metrics(self, model, frozen, tokens_BL, key):
    """CE, MSE and token accuracy at fixed t (the same noise every evaluation)."""
    if self.head:
      return self._head_eval(model, frozen, tokens_BL, key)
    out = {}
    for i, t in enumerate(EVAL_TIMES):
      t_B = jnp.full((tokens_BL.shape[0],), t)
      _, m = self.loss(model, frozen, tokens_BL, jax.random.fold_in(key, i), t_B)
      out.update({f'ce_t{t}': m['ce'], f'mse_t{t}': m['mse'],
                  f'token_accuracy_t{t}': m['token_accuracy']})
    out['ce'] = jnp.mean(jnp.stack([out[f'ce_t{t}'] for t in EVAL_TIMES]))
    out['mse'] = jnp.mean(jnp.stack([out[f'mse_t{t}'] for t in EVAL_TIMES]))
    out['loss'] = self.flow.ce_weight * out['ce'] + self.flow.mse_weight * out['mse']
    return out

  def sample(self, model, frozen, tokens_BL, key):
    """As many generations as there are windows (their values are not used)."""
    c = self.config
    shape = (tokens_BL.shape[0], c.max_length // c.chunk_size, c.vae.latent_dim)
    noise = flow.sample_noise(key, shape, c.flow.noise_std * c.sample.noise_scale)
    if self.head:
      decode = lambda z_BTZ, n_T: jnp.argmax(frozen['vae'].decode(z_BTZ), -1).reshape(
          z_BTZ.shape[0], z_BTZ.shape[1], c.chunk_size)
      return samplers.head_sample(model, decode, noise, c.sample.steps, key,
                                  shift=self.flow.sample_shift)[1]
    x = samplers.generate(model, noise, c.sample.steps, self.flow)
    return jnp.argmax(frozen['vae'].decode(model.to_latent(x)), axis=-1)

  def prepare(self, params, frozen_graphdefs, frozen, batches):
    """Measures the per-dimension mean and std of the frozen encoder's latents on
    training windows, once, into the flow model (when `flow.standardize`)."""
    if not self.flow.standardize:
      return params

    @jax.jit
    def moments(vae_params, tokens_BL):
      z = nnx.merge(frozen_graphdefs['vae'], vae_params).encode(tokens_BL)[0]
      z_MZ = z.reshape(-1, z.shape[-1])
      return z_MZ.shape[0], z_MZ.sum(0), jnp.square(z_MZ).sum(0)

    count, total, squares = 0, 0.0, 0.0
    for tokens_BL in itertools.islice(batches, STATS_BATCHES):
      n, s1, s2 = moments(frozen['vae'], tokens_BL)
      count, total, squares = count + n, total + s1, squares + s2
    mean = total / count
    std = jnp.sqrt(jnp.maximum(squares / count - jnp.square(mean), 1e-12))
    put = lambda value, like: jax.device_put(value.astype(like.dtype), like.sharding)
    return {**params, 'latent_mean': put(mean, params['latent_mean']),
            'latent_std': put(std, params['latent_std'])}

  def wandb_batch_names(self, mean):
    names = {'diffusion/batch_mse_loss': mean['mse']}
    if 'ce' in mean:  # training computes CE only when it is part of the loss
      names['diffusion/batch_ce_loss'] = mean['ce']
    return names

  def train_flops(self, batch):
    vae_forward = flops.vae_forward(self.config, batch)
    if self.head:  # the frozen encoder forward; the generator forward and backward
      decoder = (3 * self.config.head.batch_mul * vae_forward['decoder']
                 if self.flow.ce_weight else 0)
      return (3 * flops.generator_forward(self.config, batch)
              + vae_forward['encoder'] + decoder)
    # The frozen encoder runs forward only; the frozen decoder forward and backward
    # through its activations, without weight gradients; self-conditioning adds a
    # forward pass for the estimate.
    passes = 3 + self.flow.self_condition
    return (passes * flops.dit_forward(self.config, batch) + vae_forward['encoder']
            + 2 * vae_forward['decoder'])
