"""Statistics of token sequences and latent sets: pure NumPy, no model.

Entropies are in bits; n-grams never cross a sequence boundary.
"""

from __future__ import annotations

import collections
from typing import Iterable, Sequence

import numpy as np

# ------------------------------------------------------------------- text metrics


def unigram_entropy(sequences: Iterable[Sequence[int]]) -> float:
  """Entropy in bits of the pooled token distribution."""
  counts = collections.Counter(t for seq in sequences for t in seq)
  p = np.array(list(counts.values()), np.float64)
  p /= p.sum()
  return float(-(p * np.log2(p)).sum())


def _ngrams(seq: Sequence[int], n: int) -> list[tuple[int, ...]]:
  return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(sequences: Iterable[Sequence[int]], n: int) -> float:
  """Distinct n-grams over all n-grams, pooled over sequences (n-grams never
  cross a sequence boundary)."""
  grams = [g for seq in sequences for g in _ngrams(list(seq), n)]
  return len(set(grams)) / len(grams) if grams else 0.0


def repeat_ngram_rate(sequences: Iterable[Sequence[int]], n: int = 4) -> float:
  """The fraction of n-grams that already occurred earlier in the same sequence."""
  repeats = total = 0
  for seq in sequences:
    grams = _ngrams(list(seq), n)
    repeats += len(grams) - len(set(grams))
    total += len(grams)
  return repeats / total if total else 0.0


# ----------------------------------------------------------------- Fréchet distance


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((m + m.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """‖μ1-μ2‖² + Tr(Σ1 + Σ2 - 2(Σ1Σ2)^½) between two Gaussians.

  Tr((Σ1Σ2)^½) = Tr((Σ1^½ Σ2 Σ1^½)^½), which is symmetric PSD: eigh, no complex
  square roots.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(
      np.float64)
  r1 = _sqrt_psd(s1)
  cross = np.trace(_sqrt_psd(r1 @ s2 @ r1))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross)


def frechet_latent_distance(x_MZ: np.ndarray, y_MZ: np.ndarray) -> float:
  """Fréchet distance between Gaussians fitted to two sets of latent vectors."""
  x, y = np.asarray(x_MZ, np.float64), np.asarray(y_MZ, np.float64)
  return frechet_distance(x.mean(0), np.cov(x, rowvar=False),
                          y.mean(0), np.cov(y, rowvar=False))
