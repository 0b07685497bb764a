import pytest

from configs import tiny, v52
from tokcom_jax.errors import ConfigError


def test_v52_has_the_original_recipe():
  c = v52.get_config('vae')
  assert (c.max_length, c.chunk_size, c.max_length // c.chunk_size) == (1024, 4, 256)
  assert (c.vae.hidden_size, c.vae.num_heads, c.vae.num_kv_heads,
          c.vae.intermediate_size, c.vae.latent_dim) == (896, 14, 2, 4864, 896)
  assert c.vae.encoder_layers + c.vae.decoder_layers == 24 and c.dit.num_layers == 24
  assert c.tokenizer == 'meta-llama/CodeLlama-7b-hf'
  assert c.data.source == 'hf:wikitext:wikitext-2-raw-v1'
  assert c.train.batch_size == 8
  assert (c.train.vae.epochs, c.train.vae.lr) == (5, 1e-4)
  assert (c.train.diffusion.epochs, c.train.diffusion.lr) == (10, 3e-5)
  assert c.flow.noise_std == 0.05
  assert (c.sample.steps, c.sample.num_samples, c.sample.sample_every) == (50, 2, 1)
  assert c.wandb.project == 'TokCom-v5.2'
  assert v52.get_config('diffusion').stage == 'diffusion'


def test_modifiers_by_short_and_dotted_names():
  c = v52.get_config('diffusion,batch_size=16,vae.encoder_layers=6,compute_dtype=float32')
  assert c.stage == 'diffusion' and c.train.batch_size == 16
  assert c.vae.encoder_layers == 6 and c.compute_dtype == 'float32'
  assert tiny.get_config('all,vae.encoder_causal=false').vae.encoder_causal is False


@pytest.mark.parametrize('arg, message', [
    ('bogus', 'unknown config argument'),
    ('vae,no_such_field=1', 'unknown config field'),
    ('vae,lr=1e-3', 'ambiguous'),
    ('vae,batch_size=big', 'expected a int'),
    ('vae,max_length=1022', 'not divisible by chunk_size'),
    ('vae,vae.num_heads=5', 'not divisible by vae.num_heads'),
    ('vae,dit.num_kv_heads=3', 'not divisible by dit.num_kv_heads'),
    ('vae,compute_dtype=float16', 'compute_dtype'),
])
def test_bad_arguments_fail_with_one_line(arg, message):
  with pytest.raises(ConfigError, match=message) as info:
    v52.get_config(arg)
  assert '\n' not in str(info.value)


def test_configs_are_locked():
  c = tiny.get_config('vae')
  with pytest.raises(AttributeError):
    c.not_a_field = 1


def test_one_switch_brings_back_the_v52_recipe():
  from configs import tiny, v52
  original = v52.get_config('diffusion')
  switched = tiny.get_config('diffusion,recipe=v52')
  assert switched.flow.to_dict() == original.flow.to_dict()
  assert switched.vae.latent_noise == switched.vae.token_dropout == 0.0
  assert switched.flow.order == 'parallel' and switched.sample.noise_scale == 1.0
  assert switched.sample.steps == 50
  assert tiny.get_config('diffusion').flow.order == 'head'
  # Modifiers after the switch still apply on top of it.
  assert tiny.get_config('diffusion,recipe=v52,noise_std=0.2').flow.noise_std == 0.2
  with pytest.raises(ConfigError, match="recipe='x': use one of"):
    tiny.get_config('diffusion,recipe=x')
