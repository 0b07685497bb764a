import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tokcom_jax
from tokcom_jax.errors import SamplingError
from tokcom_jax.models import decoding


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_encode_decode_round_trip_through_the_trained_vae(runs):
  model = tokcom_jax.load(runs[0])
  text = 'class Point:\n    x = 1\n    y = 2\n# 1\nclass Point:\n    x = 1\n'
  z = model.encode(text)
  ids = model.tokenizer(text, add_special_tokens=False)['input_ids']
  assert z.shape == (-(-len(ids) // 4), 16) and z.dtype == np.float32
  rebuilt = model.reconstruct(text)
  # decode() returns every token of the last chunk; reconstruct() cuts at the input's.
  assert model.decode(z).startswith(rebuilt)
  back = model.tokenizer(rebuilt, add_special_tokens=False)['input_ids']
  agree = np.mean([a == b for a, b in zip(back, ids)])
  assert agree >= 0.6, (agree, rebuilt)  # chance is ~1/384


def test_generation_is_deterministic_and_keeps_the_prompt(runs):
  model = tokcom_jax.load(runs[1])
  a = model.generate(2, steps=5, seed=1)
  assert a == model.generate(2, steps=5, seed=1) and len(a) == 2
  hot = lambda seed: model.generate(2, steps=5, seed=seed, temperature=1.0)
  assert hot(1) == hot(1) and hot(1) != hot(2)
  prompt = 'import os\nimport'
  for text in model.generate(2, steps=5, prompt=prompt):
    assert text.startswith(prompt)


def test_a_prompt_ending_inside_a_chunk_conditions_that_chunk(runs):
  """The prompt's tokens come back verbatim in the token array (not pasted onto the
  text), and the chunk it ends inside is generated toward its known first tokens:
  the guided latents decode those tokens likelier than unguided ones from the same
  noise."""
  import optax
  from flax import nnx
  model = tokcom_jax.load(runs[1])
  prompt = 'import os\nimport sys\n\n\ndef main'
  ids = model.tokenizer(prompt, add_special_tokens=False)['input_ids']
  K, N, Z = 4, model.max_chunks, 16
  assert len(ids) % K, 'the prompt must end inside a chunk'
  latents, tokens = model.sample(3, steps=6, seed=2, prompt=prompt)
  np.testing.assert_array_equal(tokens[:, :len(ids)], np.broadcast_to(ids, (3, len(ids))))
  held = len(ids) // K
  prefix = np.zeros((1, N * K), np.int32)
  prefix_mask = np.zeros((1, N * K), np.float32)
  prefix[0, held * K:len(ids)] = ids[held * K:]
  prefix_mask[0, held * K:len(ids)] = 1
  mask, known = jnp.zeros((1, N), bool), jnp.zeros((1, N, Z))
  x0 = 0.05 * jax.random.normal(jax.random.key(0), (1, N, Z))
  plain = model._sample_latents(model.dit_params, x0, 6, mask, known)
  guided = model._sample_latents_with_prefix(
      model.dit_params, model.vae_params, x0, 6, mask, known, prefix, prefix_mask,
      model.encode(prompt)[None])
  vae = nnx.merge(model.vae_graphdef, model.vae_params)
  ce = lambda z: float((optax.softmax_cross_entropy_with_integer_labels(
      vae.decode(z), prefix) * prefix_mask).sum())
  assert ce(guided) < 0.5 * ce(plain), (ce(guided), ce(plain))


def test_prompt_chunks_come_back_exactly(runs):
  model = tokcom_jax.load(runs[1])
  prompt = 'import os\nimport sys\n'
  ids = model.tokenizer(prompt, add_special_tokens=False)['input_ids']
  held = len(ids) // 4
  known = model.encode(prompt)[:held]
  N = model.max_chunks
  mask = np.zeros((1, N), bool)
  mask[:, :held] = True
  full = np.zeros((1, N, 16), np.float32)
  full[0, :held] = known
  z = model._sample_latents(model.dit_params, jnp.zeros((1, N, 16)), 7,
                            jnp.asarray(mask), jnp.asarray(full))
  np.testing.assert_array_equal(np.asarray(z)[0, :held], known)


def test_repeated_calls_do_not_recompile(runs):
  model = tokcom_jax.load(runs[1])
  model.generate(2, steps=3)
  before = model._sample_latents._cache_size()
  model.generate(2, steps=9, seed=4)
  assert model._sample_latents._cache_size() == before


def test_token_choice():
  logits = jnp.log(jnp.array([[[0.5, 0.3, 0.15, 0.05]]]))
  key = jax.random.key(0)
  assert int(decoding.choose_tokens(logits, key)[0, 0]) == 0
  draws = jax.vmap(lambda k: decoding.choose_tokens(logits, k, 1.0, top_k=2))(
      jax.random.split(key, 2000))
  assert set(np.unique(draws).tolist()) == {0, 1}
  draws = jax.vmap(lambda k: decoding.choose_tokens(logits, k, 1.0, top_p=0.7))(
      jax.random.split(key, 2000))
  assert set(np.unique(draws).tolist()) == {0, 1}  # 0.5 < 0.7 ≤ 0.8


def test_noise_scale_scales_the_starting_noise(runs, monkeypatch):
  """The sampler starts from the run's noise × noise_scale (default: the run's
  sample.noise_scale), with the same draw: only the scale changes."""
  model = tokcom_jax.load(runs[1])
  starts = []
  inner = model._sample_latents
  monkeypatch.setattr(model, '_sample_latents',
                      lambda params, x0, *a: starts.append(np.asarray(x0)) or inner(
                          params, x0, *a))
  model.sample(2, steps=2, seed=3)
  model.sample(2, steps=2, seed=3, noise_scale=0.25)
  default = model.config.sample.noise_scale
  assert default == 0.5  # configs/tiny.py
  np.testing.assert_allclose(starts[1], 0.25 / default * starts[0], rtol=1e-6)
  assert float(np.abs(starts[0]).mean()) > 0
  with pytest.raises(SamplingError, match='noise_scale'):
    model.generate(1, noise_scale=0.0)


def test_api_errors(runs):
  vae_only = tokcom_jax.load(runs[0])
  with pytest.raises(SamplingError, match='stage-1'):
    vae_only.generate(1)
  model = tokcom_jax.load(runs[1])
  with pytest.raises(SamplingError, match='empty'):
    model.encode('')
  assert model.encode('    ').shape[0] >= 1  # an indentation is text
  with pytest.raises(SamplingError, match='not valid UTF-8'):
    model.encode('abc\udcff')  # a byte that is not UTF-8, as argv gives it
  with pytest.raises(SamplingError, match='num_chunks'):
    model.generate(1, num_chunks=model.max_chunks + 1)
  with pytest.raises(SamplingError, match='steps'):
    model.generate(1, steps=0)
  with pytest.raises(SamplingError, match='shorten'):
    model.generate(1, prompt='x = 1\n' * 200)
  with pytest.raises(SamplingError, match=r'\[N, 16\]'):
    model.decode(np.zeros((3, 5), np.float32))


def run_cli(*args):
  return subprocess.run([sys.executable, os.path.join(REPO, 'sample.py'), *args],
                        capture_output=True, text=True, cwd=REPO,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))


@pytest.mark.slow
def test_cli_generates_and_fails_in_one_line(runs, tmp_path):
  ok = run_cli(f'--workdir={runs[1]}', '--steps=3', '--num_samples=2',
               f'--output_file={tmp_path / "g.jsonl"}')
  assert ok.returncode == 0, ok.stderr
  assert ok.stdout.startswith(f'workdir: {runs[1]}') and '─' * 60 in ok.stdout
  assert len(open(tmp_path / 'g.jsonl').readlines()) == 2
  shape, dtype = tmp_path / 'shape.npy', tmp_path / 'dtype.npy'
  np.save(shape, np.zeros((4, 3), np.float32))
  np.save(dtype, np.zeros((4, 16), np.int32))
  for args, message in [
      ([f'--workdir={tmp_path / "none"}'], 'does not exist'),
      ([f'--workdir={runs[0]}'], 'stage-1'),
      ([f'--workdir={runs[1]}', '--steps=0'], 'positive'),
      ([f'--workdir={runs[1]}', '--mode=encode'], 'needs --input_text'),
      ([f'--workdir={runs[1]}', '--steps=-3'], 'positive'),
      ([f'--workdir={runs[1]}', '--num_chunks=9'], 'between 1 and 8'),
      ([f'--workdir={runs[1]}', '--prompt=' + 'x = 1\n' * 40], 'shorten it'),
      ([f'--workdir={runs[1]}', '--mode=decode', f'--input_file={shape}'],
       'latents must be a float array [N, 16]; got float32 [4, 3]'),
      ([f'--workdir={runs[1]}', '--mode=decode', f'--input_file={dtype}'],
       'got int32 [4, 16]'),
      ([f'--workdir={runs[1]}', '--mode=decode', f'--input_file={tmp_path}/no.npy'],
       f'--input_file={tmp_path}/no.npy: does not exist'),
  ]:
    bad = run_cli(*args)
    assert bad.returncode == 2, (args, bad.stderr)
    assert bad.stderr.strip().splitlines()[-1].startswith('error: ')
    assert message in bad.stderr and 'Traceback' not in bad.stderr
