"""The latent prior of stage 1 (`vae.prior_weight`): a flow model trained with the
VAE on its latents, whose loss reaches the encoder."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import tiny
from tokcom_jax import stages
from tokcom_jax.models import flow


SMALL = ('vae,max_length=16,vae.hidden_size=32,vae.intermediate_size=64,'
         'vae.latent_dim=8,dit.hidden_size=32,dit.num_layers=1,'
         'dit.intermediate_size=64,dit.time_freq_dim=32,head.width=32')
DIT = ',order=chunkwise,self_condition=True'  # the DiT prior (the generator's: below)


def build(prior_weight):
  config = tiny.get_config(f'{SMALL}{DIT},prior_weight={prior_weight}')
  stage = stages.get(config, 'vae')
  return config, stage, stage.build(nnx.Rngs(0))


def test_no_prior_no_parameters_and_the_loss_of_before():
  _, stage, model = build(0.0)
  assert not hasattr(model, 'prior')
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 1024)
  _, metrics = nnx.jit(lambda m: stage.loss(m, {}, tokens, jax.random.key(1)))(model)
  assert 'prior_mse' not in metrics
  np.testing.assert_allclose(metrics['loss'], metrics['ce'], rtol=1e-6)


@pytest.mark.parametrize('order', ['parallel', 'chunkwise'])
def test_the_prior_loss_reaches_the_encoder_and_trains_the_prior(order):
  config = tiny.get_config(f'{SMALL}{DIT},prior_weight=0.5,order={order}')
  stage = stages.get(config, 'vae')
  model = stage.build(nnx.Rngs(0))
  # The run's flow recipe, on the VAE's own (unstandardized) latents.
  assert model.cfg.prior.causal == (order == 'chunkwise')
  assert not model.cfg.prior.standardize and model.cfg.prior.self_condition
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 1024)
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit  # one compiled call: both gradients and the metrics
  def grads_and_metrics(params):
    def part(params, which):
      m = nnx.merge(graphdef, params)
      _, metrics = stage.loss(m, {}, tokens, jax.random.key(1))
      return metrics[which]
    _, metrics = stage.loss(nnx.merge(graphdef, params), {}, tokens, jax.random.key(1))
    return jax.grad(part)(params, 'prior_mse'), jax.grad(part)(params, 'ce'), metrics

  prior_grads, ce_grads, metrics = grads_and_metrics(params)
  norm = lambda tree: float(optax.tree.norm(tree))
  # The prior's MSE moves the encoder (through both its input and its target) and
  # the prior itself; the reconstruction CE never touches the prior.
  assert norm(prior_grads['encoder']) > 1e-4 and norm(prior_grads['to_mean']) > 1e-4
  assert norm(prior_grads['prior']) > 1e-3
  assert norm(ce_grads['prior']) == 0.0
  # ... and nothing of the decoder.
  assert norm(prior_grads['decoder']) == 0.0
  np.testing.assert_allclose(metrics['loss'], metrics['ce'] + 0.5 * metrics['prior_mse'],
                             rtol=1e-6)


def test_the_prior_mse_is_the_flow_loss_of_the_latent_means():
  """At evaluation (no rng) it is stage 2's MSE with the same noise and times: the
  prior of a trained VAE tells how well a flow model of its size can predict it."""
  config, stage, model = build(1.0)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 1024)

  @nnx.jit
  def loss_and_by_hand(model):
    _, metrics = stage.loss(model, {}, tokens, None)
    mean_BNZ = model.encode(tokens)[0]
    key = jax.random.key(stages.vae.PRIOR_EVAL_KEY)
    pred, _ = flow.noised_prediction(model.prior, mean_BNZ, key,
                                     flow.FlowConfig.from_config(config))
    return metrics, jnp.mean(jnp.square(pred - mean_BNZ))

  metrics, by_hand = loss_and_by_hand(model)
  np.testing.assert_allclose(metrics['prior_mse'], by_hand, rtol=1e-6)
  assert 0.2 < float(metrics['prior_mse']) < 5.0  # an untrained prior: about 1


def test_a_chunk_generator_prior_is_trained_by_its_own_loss_into_the_encoder():
  """With flow.order=head the prior is the chunk generator: its whole loss (on the
  latent means, the window's tokens as its input) is prior_mse, and it moves the
  encoder through its target."""
  from tokcom_jax.models import generator
  config = tiny.get_config(f'{SMALL},prior_weight=0.5,order=head')
  stage = stages.get(config, 'vae')
  model = stage.build(nnx.Rngs(0))
  assert isinstance(model.prior, generator.ChunkGenerator)
  assert not model.cfg.prior.standardize
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 1024)
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def check(params):
    m = nnx.merge(graphdef, params)
    _, metrics = stage.loss(m, {}, tokens, None)
    by_hand = generator.loss_fn(m.prior, tokens, m.encode(tokens)[0],
                                jax.random.key(stages.vae.PRIOR_EVAL_KEY),
                                flow.FlowConfig.from_config(config))[0]
    grads = jax.grad(lambda p: stage.loss(nnx.merge(graphdef, p), {}, tokens,
                                          jax.random.key(1))[1]['prior_mse'])(params)
    return metrics['prior_mse'], by_hand, grads

  prior_mse, by_hand, grads = check(params)
  np.testing.assert_allclose(prior_mse, by_hand, rtol=1e-6)
  assert float(optax.tree.norm(grads['to_mean'])) > 1e-4
  assert float(optax.tree.norm(grads['prior'])) > 1e-3


@pytest.mark.slow
def test_stage_two_reads_a_vae_with_a_prior_and_samples(corpus, tmp_path):
  """The prior's parameters live in the VAE's checkpoint: the frozen VAE of stage 2
  and sampling restore them with the rest, and training lowers the prior's MSE."""
  import json
  from tests import train_fixtures
  import tokcom_jax
  from tokcom_jax.training import trainer as trainer_lib
  source, cache = corpus
  prior = {'vae.prior_weight': 1.0, 'train.vae.num_steps': 12, 'eval_every': 6}
  trainer_lib.Trainer(train_fixtures.micro_config(source, cache, **prior),
                    str(tmp_path / 'vae')).run()
  evals = [json.loads(line) for line in open(tmp_path / 'vae' / 'metrics.jsonl')]
  prior_mse = [e['eval/prior_mse'] for e in evals if 'eval/prior_mse' in e]
  assert len(prior_mse) == 2 and prior_mse[1] < prior_mse[0]
  trainer_lib.Trainer(train_fixtures.micro_config(
      source, cache, stage='diffusion', vae_workdir=str(tmp_path / 'vae'),
      **{**prior, 'train.diffusion.num_steps': 2}), str(tmp_path / 'diffusion')).run()
  model = tokcom_jax.load(str(tmp_path / 'diffusion'))
  assert 'prior' in model.vae_params
  latents, tokens = model.sample(2, steps=2, seed=0)
  assert latents.shape == (2, 8, 8) and tokens.shape == (2, 32)
