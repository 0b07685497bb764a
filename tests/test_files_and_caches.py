"""Caches that heal, whole-file writes, and logs without append on object stores."""

import json
import os
import re

import ml_collections
import numpy as np
import pytest
from etils import epath

from tests import train_fixtures
from tokcom_jax.data import batches
from tokcom_jax.storage import files
from tokcom_jax.training import metrics_log


@pytest.fixture
def corpus(tmp_path):
  return train_fixtures.small_corpus(
      tmp_path / 'corpus', [f'def f{i}(x):\n    return x * {i}\n' * 30 for i in range(4)])


def damage(path, how: str):
  size = os.path.getsize(path)
  if how == 'truncated':  # a copy or a disk that ran out, mid-array
    os.truncate(path, size - 7)
  elif how == 'cut in the header':
    os.truncate(path, 20)
  elif how == 'empty':
    os.truncate(path, 0)
  elif how == 'longer':
    with open(path, 'ab') as f:
      f.write(b'\0' * 6)
  elif how == 'another array':
    np.save(path, np.zeros((3, 5), np.float32))


@pytest.mark.parametrize('how, reason', [
    ('truncated', r'\d+ bytes, its header says \d+'),
    ('cut in the header', 'unreadable header'),
    ('empty', 'unreadable header'),
    ('longer', r'\d+ bytes, its header says \d+'),
    ('another array', r'holds float32 \[3, 5\], not a token stream'),
])
def test_a_damaged_token_cache_is_rebuilt_with_one_warning(corpus, tmp_path, caplog,
                                                           how, reason):
  source, tok = corpus
  first = np.array(batches.load_token_stream(source, 'train', tok, tmp_path / 'cache'))
  (path,) = (tmp_path / 'cache').glob('*.npy')
  damage(path, how)
  assert batches.cache_problem(path) is not None
  with caplog.at_level('WARNING'):
    again = batches.load_token_stream(source, 'train', tok, tmp_path / 'cache')
  np.testing.assert_array_equal(again, first)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert len(warnings) == 1, warnings
  assert warnings[0].startswith(f'token cache {path} is damaged (')
  assert warnings[0].endswith('): building it again')
  assert re.search(reason, warnings[0]), warnings[0]
  assert batches.cache_problem(path) is None
  assert sorted(os.listdir(tmp_path / 'cache')) == [path.name]  # no temporary left
  caplog.clear()
  batches.load_token_stream(source, 'train', tok, tmp_path / 'cache')
  assert not caplog.records  # whole again: read, not rebuilt


def test_a_touched_file_changes_the_cache_key(corpus, tmp_path):
  """Names, sizes and modification times are the key: same bytes, new mtime."""
  source, tok = corpus
  before = batches.cache_path(tmp_path, source, 'train', tok)
  doc = tmp_path / 'corpus' / 'doc0.txt'
  stat = doc.stat()
  os.utime(doc, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
  assert batches.cache_path(tmp_path, source, 'train', tok) != before


def test_a_failed_write_leaves_the_old_file_whole(tmp_path):
  path = tmp_path / 'config.json'
  files.write_text(path, '{"old": 1}')
  with pytest.raises(RuntimeError):
    with files.atomic_open(path) as f:
      f.write(b'{"new": ')
      raise RuntimeError('killed mid-write')
  assert path.read_text() == '{"old": 1}'
  assert os.listdir(tmp_path) == ['config.json']
  files.write_text(path, '{"new": 2}')
  assert path.read_text() == '{"new": 2}'
  open(tmp_path / 'plain', 'w').close()  # the permissions a plain open() gives
  assert os.stat(path).st_mode == os.stat(tmp_path / 'plain').st_mode


def test_logs_of_an_object_store_workdir_are_rewritten_not_appended(tmp_path,
                                                                     monkeypatch):
  """gs:// has no append: the same code path, through epath, on a local directory,
  with appending made to fail."""
  monkeypatch.delenv('WANDB_MODE', raising=False)
  config = ml_collections.ConfigDict({'wandb': {'mode': 'disabled', 'project': 'p'}})
  rows = [(1, {'train/loss': 2.5}), (2, {'train/loss': 2.25}), (3, {'eval/loss': 2.0})]

  def run(workdir):
    log = metrics_log.MetricsLog(workdir, config, resume_step=0)
    for step, row in rows:
      log.write(step, row)
    log.write_samples(3, 'vae/reconstructions', ('step', 'text'), [{'text': 'x'}])
    metrics_log.MetricsLog(workdir, config, resume_step=2)  # a resume drops step 3
    return [(workdir / name).read_text() for name in ('metrics.jsonl', 'samples.jsonl')]

  (tmp_path / 'local').mkdir()
  local = run(epath.Path(tmp_path / 'local'))
  gpath = type(epath.Path(tmp_path))
  real_open = gpath.open

  def no_append(self, mode='r', *args, **kwargs):
    assert 'a' not in mode, f'{self} opened for append'
    return real_open(self, mode, *args, **kwargs)
  monkeypatch.setattr(gpath, 'open', no_append)
  monkeypatch.setattr(files, 'is_remote', lambda path: True)
  (tmp_path / 'remote').mkdir()
  remote = run(epath.Path(tmp_path / 'remote'))
  assert remote == local
  assert [json.loads(l)['step'] for l in local[0].splitlines()] == [1, 2]
  assert local[1] == ''


def test_a_write_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path):
  target = tmp_path / 'real.txt'
  target.write_text('old')
  link = tmp_path / 'link.txt'
  link.symlink_to(target)
  files.write_text(link, 'new')
  assert link.is_symlink() and os.readlink(link) == str(target)
  assert target.read_text() == 'new'


def test_a_named_pipe_is_written_into_not_replaced(tmp_path):
  import stat
  fifo = tmp_path / 'pipe'
  os.mkfifo(fifo)
  reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that the writer never waits
  try:
    files.write_text(fifo, 'through the pipe')
    assert os.read(reader, 100) == b'through the pipe'
  finally:
    os.close(reader)
  assert stat.S_ISFIFO(os.stat(fifo).st_mode)
  assert [p.name for p in tmp_path.iterdir()] == ['pipe']  # no temporary file left


@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='no /dev/full')
def test_a_device_is_written_in_place_and_its_errors_reach_the_caller():
  import errno
  import stat
  files.write_text('/dev/null', 'discarded')
  with pytest.raises(OSError) as e:
    files.write_text('/dev/full', 'x' * 10)
  assert e.value.errno == errno.ENOSPC
  assert all(stat.S_ISCHR(os.stat(d).st_mode) for d in ('/dev/null', '/dev/full'))


def test_a_torn_metrics_line_is_skipped_with_one_warning(tmp_path, caplog):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n\n[1, 2]\n')
  with caplog.at_level('WARNING'):
    assert metrics_log.read_rows(path) == [{'step': 1, 'loss': 2.0}]
  assert '2 line(s)' in caplog.text
  assert metrics_log.read_rows(tmp_path / 'absent.jsonl') == []
