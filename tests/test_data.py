import numpy as np
import pytest

from tests import train_fixtures
from tokcom_jax.data import batches, sources, tokenizer
from tokcom_jax.errors import DataError


def test_train_order_is_a_pure_function_of_seed_and_step():
  a = [batches.train_indices(s, seed=3, num_windows=50, global_batch=8) for s in range(12)]
  b = [batches.train_indices(s, seed=3, num_windows=50, global_batch=8) for s in range(12)]
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  other = batches.train_indices(0, seed=4, num_windows=50, global_batch=8)
  assert not np.array_equal(a[0], other)
  # One epoch (6 steps of 8 out of 50 windows) never repeats a window, and the next
  # epoch is a different permutation.
  epoch0 = np.concatenate(a[:6])
  assert len(set(epoch0.tolist())) == 48
  assert not np.array_equal(np.concatenate(a[6:12]), epoch0)


def test_windows_and_eval_indices():
  w = batches.Windows(np.arange(23, dtype=np.uint16), 5)
  assert w.num_windows == 4
  np.testing.assert_array_equal(w.get(np.array([2, 0])), [[10, 11, 12, 13, 14],
                                                          [0, 1, 2, 3, 4]])
  assert w.get(np.array([1])).dtype == np.int32
  np.testing.assert_array_equal(batches.eval_indices(1, 4, 3), [3, 0, 1])


def test_bpe_round_trips_text():
  texts = ['def f(x):\n    return x + 1\n', 'class A:\n    pass\n', 'ünïcödé ✓'] * 50
  tok = tokenizer.train_bpe(texts, vocab_size=300)
  for text in ('def g(y):\n    return y * 2\n', 'ünïcödé ✓ and more 123'):
    ids = tok(text, add_special_tokens=False)['input_ids']
    assert tok.decode(ids) == text
  assert tok.eos_token == tokenizer.EOS and tok.eos_token_id is not None


def test_token_cache_is_built_once_and_memory_mapped(tmp_path, monkeypatch):
  source, tok = train_fixtures.small_corpus(
      tmp_path / 'corpus', [f'document number {i} ' * 20 for i in range(6)])
  stream = batches.load_token_stream(source, 'train', tok, tmp_path / 'cache')
  assert stream.size > 0 and int(np.sum(stream == tok.eos_token_id)) == 5
  monkeypatch.setattr(batches, 'iter_documents',
                      lambda *a, **k: pytest.fail('the cache was not reused'))
  again = batches.load_token_stream(source, 'train', tok, tmp_path / 'cache')
  assert isinstance(again, np.memmap)
  np.testing.assert_array_equal(again, stream)
  assert not list((tmp_path / 'cache').glob('*.tmp'))


def test_validation_split_is_stable_and_never_empty(tmp_path):
  names = [f'f{i}.py' for i in range(500)]
  chosen = sources.validation_names(names)
  assert 3 <= len(chosen) <= 20 and chosen == sources.validation_names(list(reversed(names)))
  assert len(sources.validation_names(['a.py', 'b.py'])) == 1


def test_files_source_skips_non_utf8_files_by_name(tmp_path, caplog):
  (tmp_path / 'good.txt').write_text('hello')
  (tmp_path / 'bad.txt').write_bytes(b'\xff\xfe\x00bad')
  docs = list(sources.iter_documents(f'files:{tmp_path}/*.txt', 'train')) + list(
      sources.iter_documents(f'files:{tmp_path}/*.txt', 'validation'))
  assert docs == ['hello']
  assert 'bad.txt' in caplog.text


@pytest.mark.parametrize('source, message', [
    ('files:/nonexistent/*.txt', 'matches no files'),
    ('s3:bucket', 'unknown data source'),
])
def test_bad_sources(source, message):
  with pytest.raises(DataError, match=message):
    list(sources.iter_documents(source, 'train'))


def test_stdlib_source_finds_the_standard_library():
  files = sources.stdlib_files()
  assert len(files) > 100
  assert any(f.name == 'json' or f.parent.name == 'json' for f in files)


def test_offline_hub_tokenizer_names_the_alternative(monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  with pytest.raises(DataError, match='configs/tiny.py') as e:
    tokenizer.load_tokenizer('meta-llama/CodeLlama-7b-hf')
  assert '\n' not in str(e.value)


def test_tokenizer_in_a_remote_workdir_goes_through_epath(tmp_path, monkeypatch):
  """gs:// workdirs: transformers writes locally; the files are copied via epath."""
  monkeypatch.setattr(tokenizer, 'is_remote', lambda path: True)
  texts = lambda: ['def f(x):\n    return x + 1\n'] * 50
  saved = tokenizer.load_tokenizer('bpe:300', tmp_path / 'tok', texts)
  assert (tmp_path / 'tok' / 'tokenizer.json').exists()
  again = tokenizer.load_tokenizer('bpe:300', tmp_path / 'tok', lambda: [])  # no retraining
  ids = saved('return x + 1')['input_ids']
  assert again('return x + 1')['input_ids'] == ids and len(ids) > 1


def test_files_split_does_not_depend_on_where_the_corpus_lives(tmp_path):
  """The split of a `files:` source hashes paths relative to the glob's fixed
  prefix: a copy of the corpus elsewhere holds out the same documents."""
  docs = {f'pkg{i % 3}/mod{i}.py': f'def f{i}(x):\n    return x * {i}\n' * 5
          for i in range(120)}
  streams, splits = [], []
  for root in (tmp_path / 'a', tmp_path / 'deeper' / 'copy' / 'b'):
    for name, text in docs.items():
      (root / name).parent.mkdir(parents=True, exist_ok=True)
      (root / name).write_text(text)
    source = f'files:{root}/**/*.py'
    splits.append([list(sources.iter_documents(source, split))
                   for split in ('train', 'validation')])
  assert splits[0] == splits[1]
  train, validation = splits[0]
  assert 1 <= len(validation) < 12 and len(train) + len(validation) == 120
  # The held-out documents are those whose relative names hash into the split.
  expected = sources.validation_names(sorted(docs))
  assert sorted(validation) == sorted(docs[n] for n in expected)
  tok = tokenizer.train_bpe(train, vocab_size=300)
  for root in (tmp_path / 'a', tmp_path / 'deeper' / 'copy' / 'b'):
    streams.append(np.asarray(batches.load_token_stream(
        f'files:{root}/**/*.py', 'validation', tok, tmp_path / 'cache')))
  np.testing.assert_array_equal(streams[0], streams[1])
  assert streams[0].size > 0


def test_a_changed_file_makes_a_new_token_cache(tmp_path):
  corpus = tmp_path / 'corpus'
  source, tok = train_fixtures.small_corpus(
      corpus, [f'document number {i} ' * 20 for i in range(4)])
  before = np.asarray(batches.load_token_stream(source, 'train', tok, tmp_path / 'c'))
  (corpus / 'doc1.txt').write_text('a different text ' * 30)
  after = np.asarray(batches.load_token_stream(source, 'train', tok, tmp_path / 'c'))
  assert len(list((tmp_path / 'c').glob('*.npy'))) == 2
  assert not np.array_equal(before, after)
  np.testing.assert_array_equal(after, batches.tokenize_to_stream(
      sources.iter_documents(source, 'train'), tok))


def test_a_bpe_is_trained_once_per_corpus_and_shared_by_runs(tmp_path, monkeypatch):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i in range(4):
    (corpus / f'doc{i}.txt').write_text(f'def f{i}(x):\n    return x + {i}\n' * 9)
  from configs import tiny
  config = tiny.get_config('ar,tokenizer=bpe:300,vocab_size=300')
  config.unlock()
  config.data.source = f'files:{corpus}/*.txt'
  config.data.cache_dir = str(tmp_path / 'cache')
  first = tokenizer.run_tokenizer(config, tmp_path / 'run1' / 'tokenizer')
  monkeypatch.setattr(tokenizer, 'train_bpe',
                      lambda *a: pytest.fail('the trained tokenizer was not reused'))
  second = tokenizer.run_tokenizer(config, tmp_path / 'run2' / 'tokenizer')
  assert tokenizer.tokenizer_fingerprint(first) == tokenizer.tokenizer_fingerprint(
      second)
  assert (tmp_path / 'run2' / 'tokenizer' / 'tokenizer_config.json').exists()
  assert not list((tmp_path / 'run2').glob('.tokenizer-*'))  # no temporary left
