"""Teacher-forced BrierLM (CALM, arXiv 2510.27688): a sampler's quality without a
reference model. At every chunk boundary of a held-out window, the model draws the
next K tokens twice given the real text before; Brier-n of the first n tokens,

    1{x1 = y} + 1{x2 = y} - 1{x1 = x2}   (x1, x2 the two drawn n-grams, y the real one),

is an unbiased estimate of 2·p(y) - Σ_x p(x)² (the Brier score of the model's n-gram
distribution, up to a constant): 1 for a model sure of the right answer, about 1/V^n
for two independent uniform draws. BrierLM = 100 · geometric mean of Brier-1..4.

Both kinds of run draw at the same positions (every chunk boundary after the first,
so that the ar stage has a prefix): a chunk generator its chunk (flow head from noise
of `noise_scale` × noise_std, decoder argmax), the ar stage K tokens at temperature 1.
"""

from __future__ import annotations

import jax
import numpy as np

BRIER_ORDERS = (1, 2, 3, 4)


def brier(draw1_MK: np.ndarray, draw2_MK: np.ndarray, real_MK: np.ndarray, n: int
          ) -> float:
  """Brier-n over rows of n-grams (the first n of each row's K tokens)."""
  same = lambda a, b: np.all(a[:, :n] == b[:, :n], axis=-1).astype(np.float64)
  return float(np.mean(same(draw1_MK, real_MK) + same(draw2_MK, real_MK)
                       - same(draw1_MK, draw2_MK)))


def scores(draw1_MK, draw2_MK, real_MK) -> dict[str, float]:
  """Brier-1..4 (those n ≤ K) and BrierLM (negatives, noise around 0, count as 0)."""
  orders = [n for n in BRIER_ORDERS if n <= real_MK.shape[1]]
  out = {f'brier_{n}': brier(draw1_MK, draw2_MK, real_MK, n) for n in orders}
  values = np.maximum([out[f'brier_{n}'] for n in orders], 0.0)
  out['brier_lm'] = float(100.0 * np.prod(values) ** (1.0 / len(values)))
  return out


def _chunks_after_first(tokens_BL: np.ndarray, K: int) -> np.ndarray:
  B, L = tokens_BL.shape
  return tokens_BL.reshape(B, L // K, K)[:, 1:].reshape(-1, K)


def tokcom_brier(model, windows_BL: np.ndarray, batch_size: int, seed: int,
                 steps: int, noise_scale: float) -> dict[str, float]:
  """BrierLM of a TokCom run whose stage 2 is a chunk generator."""
  from tokcom_jax.inference import chunk_generation
  K = model.chunk_size
  draws = []
  for d in range(2):
    key = jax.random.fold_in(jax.random.key(seed), 1000 + d)
    draws.append(np.concatenate([
        chunk_generation.teacher_forced_chunks(
            model, windows_BL[first:first + batch_size], jax.random.fold_in(key, first),
            steps, noise_scale)
        for first in range(0, len(windows_BL), batch_size)]))
  return scores(*(_chunks_after_first(x, K) for x in draws),
                _chunks_after_first(windows_BL, K))


def ar_brier(model, windows_BL: np.ndarray, chunk_size: int, batch_size: int,
             seed: int) -> dict[str, float]:
  """BrierLM of an `ar` run at the same positions: K tokens drawn at temperature 1
  after each chunk boundary (one compiled program for every boundary)."""
  from tokcom_jax.models import lm
  B, L = windows_BL.shape
  K = chunk_size
  draws = np.zeros((2, B, L), np.int32)
  for d in range(2):
    key = jax.random.fold_in(jax.random.key(seed), 2000 + d)
    for first in range(0, B, batch_size):
      window = windows_BL[first:first + batch_size]
      for p in range(K, L, K):
        out = lm.generate(model.graphdef, model.params, window, p,
                          jax.random.fold_in(key, first * L + p),
                          max_new_tokens=K, temperature=1.0)
        draws[d, first:first + batch_size, p:p + K] = np.asarray(out)[:, p:p + K]
  return scores(_chunks_after_first(draws[0], K), _chunks_after_first(draws[1], K),
                _chunks_after_first(windows_BL, K))
