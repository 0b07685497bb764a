import numpy as np
import pytest

from tokcom_jax import text_metrics


def test_unigram_entropy_in_bits():
  assert text_metrics.unigram_entropy([[1, 1], [2, 3]]) == pytest.approx(1.5)
  assert text_metrics.unigram_entropy([[7] * 9]) == 0.0
  assert text_metrics.unigram_entropy([list(range(8))]) == pytest.approx(3.0)


def test_distinct_n_pools_sequences_without_crossing_them():
  # Bigrams: (1,2) (2,1) (1,2) | (3,4): 3 distinct of 4; none across the boundary.
  assert text_metrics.distinct_n([[1, 2, 1, 2], [3, 4]], 2) == pytest.approx(3 / 4)
  assert text_metrics.distinct_n([[1, 2, 3], [1, 2, 3]], 3) == pytest.approx(1 / 2)
  assert text_metrics.distinct_n([[1, 2]], 3) == 0.0


def test_repeat_4gram_rate():
  # 1234 2341 3412 4123 1234: one repeat in five; the second sequence has none.
  assert text_metrics.repeat_ngram_rate([[1, 2, 3, 4, 1, 2, 3, 4]]) == pytest.approx(1 / 5)
  assert text_metrics.repeat_ngram_rate([[1, 2, 3, 4, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
                                    ) == pytest.approx(1 / 7)
  assert text_metrics.repeat_ngram_rate([[5] * 6]) == pytest.approx(2 / 3)


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(4, 4))
  cov = a @ a.T + np.eye(4)
  mu1, mu2 = np.array([1., 2, 3, 4]), np.array([0., 2, 5, 4])
  # Σ2 = c²Σ1 commute: Tr(Σ1 + Σ2 - 2(Σ1Σ2)^½) = (1-c)² Tr Σ1.
  assert text_metrics.frechet_distance(mu1, cov, mu2, 9 * cov) == pytest.approx(
      5 + 4 * np.trace(cov))
  # Diagonal: Σ (μ1-μ2)² + Σ (s1-s2)² with standard deviations s.
  s1, s2 = np.array([1., 2, 3]), np.array([2., 2, 1])
  assert text_metrics.frechet_distance(np.zeros(3), np.diag(s1**2), np.ones(3),
                                   np.diag(s2**2)) == pytest.approx(3 + 1 + 0 + 4)
  # One dimension against a non-commuting pair: symmetric, zero on itself.
  b = rng.normal(size=(4, 4))
  cov2 = b @ b.T + 0.5 * np.eye(4)
  d12 = text_metrics.frechet_distance(mu1, cov, mu2, cov2)
  assert d12 == pytest.approx(text_metrics.frechet_distance(mu2, cov2, mu1, cov))
  assert text_metrics.frechet_distance(mu1, cov, mu1, cov) == pytest.approx(0, abs=1e-9)


def test_frechet_latent_distance_from_samples():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(20000, 3))
  y = rng.normal(size=(20000, 3)) * 2 + np.array([1.0, 0.0, -1.0])
  # ‖μ‖² = 2; (1 - 2)² per dimension = 3.
  assert text_metrics.frechet_latent_distance(x, y) == pytest.approx(5.0, rel=0.03)
