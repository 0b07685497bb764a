import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tokcom_jax import evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unigram_entropy_in_bits():
  assert evaluate.unigram_entropy([[1, 1], [2, 3]]) == pytest.approx(1.5)
  assert evaluate.unigram_entropy([[7] * 9]) == 0.0
  assert evaluate.unigram_entropy([list(range(8))]) == pytest.approx(3.0)


def test_distinct_n_pools_sequences_without_crossing_them():
  # Bigrams: (1,2) (2,1) (1,2) | (3,4): 3 distinct of 4; none across the boundary.
  assert evaluate.distinct_n([[1, 2, 1, 2], [3, 4]], 2) == pytest.approx(3 / 4)
  assert evaluate.distinct_n([[1, 2, 3], [1, 2, 3]], 3) == pytest.approx(1 / 2)
  assert evaluate.distinct_n([[1, 2]], 3) == 0.0


def test_repeat_4gram_rate():
  # 1234 2341 3412 4123 1234: one repeat in five; the second sequence has none.
  assert evaluate.repeat_ngram_rate([[1, 2, 3, 4, 1, 2, 3, 4]]) == pytest.approx(1 / 5)
  assert evaluate.repeat_ngram_rate([[1, 2, 3, 4, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
                                    ) == pytest.approx(1 / 7)
  assert evaluate.repeat_ngram_rate([[5] * 6]) == pytest.approx(2 / 3)


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(4, 4))
  cov = a @ a.T + np.eye(4)
  mu1, mu2 = np.array([1., 2, 3, 4]), np.array([0., 2, 5, 4])
  # Σ2 = c²Σ1 commute: Tr(Σ1 + Σ2 - 2(Σ1Σ2)^½) = (1-c)² Tr Σ1.
  assert evaluate.frechet_distance(mu1, cov, mu2, 9 * cov) == pytest.approx(
      5 + 4 * np.trace(cov))
  # Diagonal: Σ (μ1-μ2)² + Σ (s1-s2)² with standard deviations s.
  s1, s2 = np.array([1., 2, 3]), np.array([2., 2, 1])
  assert evaluate.frechet_distance(np.zeros(3), np.diag(s1**2), np.ones(3),
                                   np.diag(s2**2)) == pytest.approx(3 + 1 + 0 + 4)
  # One dimension against a non-commuting pair: symmetric, zero on itself.
  b = rng.normal(size=(4, 4))
  cov2 = b @ b.T + 0.5 * np.eye(4)
  d12 = evaluate.frechet_distance(mu1, cov, mu2, cov2)
  assert d12 == pytest.approx(evaluate.frechet_distance(mu2, cov2, mu1, cov))
  assert evaluate.frechet_distance(mu1, cov, mu1, cov) == pytest.approx(0, abs=1e-9)


def test_frechet_latent_distance_from_samples():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(20000, 3))
  y = rng.normal(size=(20000, 3)) * 2 + np.array([1.0, 0.0, -1.0])
  # ‖μ‖² = 2; (1 - 2)² per dimension = 3.
  assert evaluate.frechet_latent_distance(x, y) == pytest.approx(5.0, rel=0.03)


def test_evaluate_a_run(runs):
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
  assert result['val_ce']['0.9'] < result['val_ce']['0.1']  # less noise, easier
  for key in ('gen_distinct_2', 'gen_distinct_3', 'gen_repeat_4gram_rate',
              'gen_roundtrip_token_accuracy'):
    assert 0.0 <= result[key] <= 1.0, key
  assert result['gen_unigram_entropy'] > 0 and result['seconds_per_sample'] > 0
  assert result['gen_frechet_latent_distance'] >= 0
  assert sorted(os.path.basename(p) for p in result['plots']) == [
      'decodability.png', 'diffusion_loss.png', 'vae_loss.png']
  assert all(open(p, 'rb').read(4) == b'\x89PNG' for p in result['plots'])
  assert len(open(os.path.join(dit_dir, 'eval_samples.jsonl')).readlines()) == 6

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
  assert 'has no checkpoints' in bad.stderr and 'Traceback' not in bad.stderr
