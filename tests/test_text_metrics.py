import numpy as np
import pytest

from tokcom_jax.evaluation import text_metrics


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


# ----------------------------------------------------------------- chunk validity

_RAMP = np.arange(100, dtype=np.uint16)  # strictly increasing: K-grams are runs


def _brute_kgrams(stream, k):
  return {tuple(int(t) for t in stream[i:i + k]) for i in range(len(stream) - k + 1)}


def test_chunk_validity_counts_kgrams_at_any_offset():
  index = text_metrics.ChunkIndex(_RAMP, 4)
  assert index.exact and index.k == 4 and len(index) == 97
  # Offset 5 is not a multiple of 4: chunks 5-8, 9-12, 13-16 start mid "block".
  assert text_metrics.chunk_validity(index, [_RAMP[5:17]]) == 1.0
  # (2, 3, 4, 5) straddles the aligned windows 0-3 and 4-7 of the stream.
  assert index.contains([[2, 3, 4, 5]]).tolist() == [True]
  # The reverse of an increasing stream never occurs in it.
  assert text_metrics.chunk_validity(index, [_RAMP[::-1][:12]]) == 0.0
  # Every token seen, but not in this order.
  assert text_metrics.chunk_validity(index, [[1, 2, 4, 3]]) == 0.0


def test_chunk_validity_hand_counted_fraction_and_partial_chunks():
  index = text_metrics.ChunkIndex(_RAMP, 4)
  # One sequence: 1-4 yes, 9 8 7 6 no, 50-53 yes; trailing 60 61 62 dropped.
  seq = [1, 2, 3, 4, 9, 8, 7, 6, 50, 51, 52, 53, 60, 61, 62]
  assert text_metrics.chunk_validity(index, [seq]) == pytest.approx(2 / 3)
  # Ragged sequences pooled: (1..4) yes [9 dropped], (9 8 7 6) no, (20..23) yes
  # [24 25 dropped], [7 8 9] has no whole chunk.
  seqs = [[1, 2, 3, 4, 9], np.array([9, 8, 7, 6]), [20, 21, 22, 23, 24, 25], [7, 8, 9]]
  assert text_metrics.chunk_validity(index, seqs) == pytest.approx(2 / 3)
  # The dropped partial chunks would have been invalid: (9) + (24, 25) are not
  # whole chunks, so appending garbage shorter than K changes nothing.
  assert text_metrics.chunk_validity(index, [[1, 2, 3, 4, 99, 0, 5]]) == 1.0
  # No whole chunk anywhere: 0.0, not a division by zero.
  assert text_metrics.chunk_validity(index, []) == 0.0
  assert text_metrics.chunk_validity(index, [[1, 2, 3], []]) == 0.0


def test_chunk_index_rejects_out_of_range_tokens_that_would_alias():
  # Tokens 0..15 pack in 4 bits: (0, 1, 2, 3) -> 0x0123. Unchecked, (0, 0, 18, 3)
  # would pack to 18 << 4 | 3 = 0x123 as well; negative ids must not wrap either.
  index = text_metrics.ChunkIndex(np.arange(16, dtype=np.uint16), 4)
  assert index.bits == 4
  assert index.contains([[0, 1, 2, 3], [0, 0, 18, 3], [0, 1, 2, -1],
                         [1 << 40, 1, 2, 3]]).tolist() == [True, False, False, False]


def test_chunk_index_blocks_keep_kgrams_across_block_boundaries():
  rng = np.random.default_rng(0)
  stream = rng.integers(0, 6, size=500).astype(np.uint16)
  whole = text_metrics.ChunkIndex(stream, 4)
  # Blocks of 7 start positions: most K-grams straddle a block edge.
  blocked = text_metrics.ChunkIndex(stream, 4, block=7)
  truth = _brute_kgrams(stream, 4)
  np.testing.assert_array_equal(whole.keys, blocked.keys)
  assert len(blocked) == len(truth)
  queries = rng.integers(0, 7, size=(2000, 4))
  expected = [tuple(q) in truth for q in queries.tolist()]
  assert blocked.contains(queries).tolist() == expected
  assert 0 < sum(expected) < len(expected)  # both outcomes exercised


@pytest.mark.parametrize('dtype,high,k,exact', [
    (np.uint16, 1 << 16, 4, True),    # full 16-bit ids: 64 bits exactly
    (np.uint32, 50_000, 4, True),     # uint32 storage, 16-bit ids: still packed
    (np.uint32, 3_000_000, 4, False), # 22 bits x 4 > 64: hashed
    (np.uint32, 3_000_000, 2, True),  # 22 bits x 2: packed
])
def test_chunk_index_matches_brute_force_across_dtypes(dtype, high, k, exact):
  rng = np.random.default_rng(1)
  # A small alphabet near the top of the range, so K-grams repeat and the high
  # bits of every packed field are exercised.
  # The stream is too short to hold all 8**k K-grams: some queries must miss.
  alphabet = np.array([0, 1, 2, 3, high - 4, high - 3, high - 2, high - 1], np.int64)
  stream = alphabet[rng.integers(0, 8, size=8**k // 2)].astype(dtype)
  index = text_metrics.ChunkIndex(stream, k)
  assert index.exact == exact
  truth = _brute_kgrams(stream, k)
  assert len(index) == len(truth)
  queries = alphabet[rng.integers(0, 8, size=(3000, k))]
  expected = [tuple(q) in truth for q in queries.tolist()]
  assert index.contains(queries).tolist() == expected
  assert 0 < sum(expected) < len(expected)


def test_chunk_index_from_memmapped_npy(tmp_path):
  path = tmp_path / 'stream.npy'
  np.save(path, np.arange(1000, dtype=np.uint32) % 300)  # 0..299 three times over
  stream = np.load(path, mmap_mode='r')
  assert isinstance(stream, np.memmap) and not stream.flags.writeable
  index = text_metrics.ChunkIndex(stream, 4, block=64)
  assert len(index) == 300  # (299, 0, 1, 2) etc. at the wraps are K-grams too
  # 298 299 0 1 wraps around: found; 7 10 11 12: not; 3 4 5 trailing: dropped.
  seq = [298, 299, 0, 1, 7, 10, 11, 12, 3, 4, 5]
  assert text_metrics.chunk_validity(index, [seq]) == pytest.approx(1 / 2)


def test_chunk_index_of_a_stream_shorter_than_k():
  index = text_metrics.ChunkIndex(np.array([1, 2, 3], np.uint16), 4)
  assert len(index) == 0
  assert text_metrics.chunk_validity(index, [[1, 2, 3, 4]]) == 0.0


# --------------------------------------------------------------------- perplexity


def test_perplexity_is_exp_of_the_pooled_mean_ce():
  assert text_metrics.perplexity(np.log(2) + np.log(8), 2) == pytest.approx(4.0)
  assert text_metrics.perplexity_from_token_ce([[np.log(2), np.log(8)]]
                                               ) == pytest.approx(4.0)
  # Pooled over tokens: mean(ln 2, ln 2, ln 16) = ln 64 / 3 -> 64 ** (1/3) = 4.
  # Per sequence the perplexities are 2 and 16: averaging those would give 9,
  # averaging their logs (one weight per sequence) sqrt(32) ~ 5.66.
  ces = [np.array([np.log(2), np.log(2)]), [np.log(16)]]
  assert text_metrics.perplexity_from_token_ce(ces) == pytest.approx(4.0)
  assert text_metrics.perplexity_from_token_ce([[0.0, 0.0, 0.0]]) == 1.0


def test_perplexity_of_no_tokens_is_an_error():
  with pytest.raises(ValueError, match='at least one'):
    text_metrics.perplexity(0.0, 0)
  with pytest.raises(ValueError, match='at least one'):
    text_metrics.perplexity_from_token_ce([[], np.zeros(0)])


# ------------------------------------------------------------------ shuffle words


def test_shuffle_words_keeps_the_words_and_is_seeded():
  text = 'the  cat sat\non the mat\tby a door'
  words = text.split()
  out = text_metrics.shuffle_words(text, np.random.default_rng(0))
  assert sorted(out.split(' ')) == sorted(words)  # single spaces, same multiset
  assert out == text_metrics.shuffle_words(text, np.random.default_rng(0))
  assert out != ' '.join(words)
  # The order is exactly rng.permutation's.
  perm = np.random.default_rng(0).permutation(len(words))
  assert out == ' '.join(words[i] for i in perm)
  assert out != text_metrics.shuffle_words(text, np.random.default_rng(1))
  assert text_metrics.shuffle_words('  ', np.random.default_rng(0)) == ''
  assert text_metrics.shuffle_words('solo', np.random.default_rng(0)) == 'solo'
