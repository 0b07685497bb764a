import json
import os
import subprocess
import sys

import pytest


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_evaluate_a_run(runs, ar_run):
  vae_dir, dit_dir = runs
  out = subprocess.run(
      [sys.executable, '-m', 'tokcom_jax.evaluate', f'--workdir={dit_dir}',
       '--num_samples=6', '--steps=4', '--num_windows=20', '--batch_size=8'],
      capture_output=True, text=True, cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout)
  assert result == json.load(open(os.path.join(dit_dir, 'eval.json')))
  curve = result['recon_token_accuracy_at_noise']
  assert list(curve) == ['0.0', '0.1', '0.3', '0.5', '1.0']
  assert curve['0.0'] == result['recon_token_accuracy'] > 0.5  # chance: 1/384
  assert curve['1.0'] < curve['0.0']  # noise the size of the latents hurts
  assert set(result['val_ce']) == set(result['val_mse']) == {'0.1', '0.5', '0.9'}
  # The fixture's flow model has 8 steps of training: too few for an ordering of
  # its losses over t to hold with a margin, so only their range is asserted.
  assert all(0 < v < 50 for v in result['val_ce'].values())
  assert all(0 <= v < 50 for v in result['val_mse'].values())
  for key in ('gen_distinct_2', 'gen_distinct_3', 'gen_repeat_4gram_rate',
              'gen_roundtrip_token_accuracy'):
    assert 0.0 <= result[key] <= 1.0, key
  assert result['gen_token_id_entropy'] > 0 and result['seconds_per_sample'] > 0
  assert result['gen_frechet_latent_distance'] >= 0
  assert sorted(os.path.basename(p) for p in result['plots']) == [
      'decodability.png', 'diffusion_loss.png', 'generation_quality.png',
      'vae_loss.png']
  assert all(open(p, 'rb').read(4) == b'\x89PNG' for p in result['plots'])
  assert len(open(os.path.join(dit_dir, 'eval_samples.jsonl')).readlines()) == 6
  # Generation quality, scored by the ar run found beside the diffusion run.
  gq = result['generation_quality']
  assert os.path.samefile(gq['reference'], ar_run)
  assert list(gq['rows']) == ['real', 'shuffled', 'tokcom', 'ar']
  for row in gq['rows'].values():
    # (a confident model can give text off its data more than 1/V per token)
    assert 1.0 < row['perplexity'] < 1e6 and 0 <= row['chunk_validity'] <= 1
    assert row['unigram_entropy'] > 0 and row['num_texts'] == 6
  # The micro corpus repeats two programs: real windows are made of chunks the
  # training stream has; the same words shuffled and joined by spaces are not.
  real, shuffled = gq['rows']['real'], gq['rows']['shuffled']
  assert real['chunk_validity'] > 0.5, gq
  assert shuffled['chunk_validity'] < real['chunk_validity'] - 0.25, gq
  # ... and the reference, trained on that corpus, finds real text far likelier.
  assert real['perplexity'] * 10 < shuffled['perplexity'], gq

  # A VAE run gets the VAE metrics only; a missing run is a one-line error.
  vae = subprocess.run(
      [sys.executable, '-m', 'tokcom_jax.evaluate', f'--workdir={vae_dir}',
       '--num_windows=8'], capture_output=True, text=True, cwd=REPO)
  assert vae.returncode == 0, vae.stderr
  assert 'val_ce' not in json.loads(vae.stdout)
  bad = subprocess.run(
      [sys.executable, '-m', 'tokcom_jax.evaluate', f'--workdir={vae_dir}/none'],
      capture_output=True, text=True, cwd=REPO)
  assert bad.returncode == 2 and bad.stderr.startswith('error: ')
  assert 'does not exist' in bad.stderr and 'Traceback' not in bad.stderr
