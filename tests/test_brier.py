"""Teacher-forced BrierLM: its estimator, on models whose score is known."""

import numpy as np

from tokcom_jax.evaluation import brier


def test_a_model_that_always_draws_the_right_tokens_scores_1():
  real = np.random.default_rng(0).integers(0, 50, (200, 4))
  s = brier.scores(real.copy(), real.copy(), real)
  assert all(s[f'brier_{n}'] == 1.0 for n in (1, 2, 3, 4))
  assert s['brier_lm'] == 100.0


def test_two_independent_uniform_draws_score_about_one_over_v():
  rng = np.random.default_rng(1)
  V, M = 10, 400_000
  real, x1, x2 = (rng.integers(0, V, (M, 4)) for _ in range(3))
  s = brier.scores(x1, x2, real)
  np.testing.assert_allclose(s['brier_1'], 1 / V, atol=3 / np.sqrt(M))
  np.testing.assert_allclose(s['brier_2'], 1 / V**2, atol=3 / np.sqrt(M))


def test_a_sure_but_wrong_model_scores_minus_1_and_brier_lm_0():
  real = np.zeros((10, 4), int)
  s = brier.scores(real + 1, real + 1, real)
  assert s['brier_1'] == -1.0 and s['brier_lm'] == 0.0


def test_brier_n_compares_the_first_n_tokens_only():
  real = np.array([[1, 2, 3, 4]])
  x = np.array([[1, 2, 9, 9]])  # right on 2 tokens, then wrong
  assert [brier.brier(x, x, real, n) for n in (1, 2, 3)] == [1.0, 1.0, -1.0]
