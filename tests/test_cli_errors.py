"""Every user-facing error of train.py: one line on stderr, exit code 2, no traceback.

Every test here starts train.py (`slow`)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(*args, env=None):
  return subprocess.run(
      [sys.executable, os.path.join(REPO, 'train.py'), *args], capture_output=True,
      text=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu', **(env or {})))


def assert_one_line_error(out, message):
  assert out.returncode == 2, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr


@pytest.fixture(scope='module')
def corpora(tmp_path_factory):
  root = tmp_path_factory.mktemp('corpora')
  (root / 'binary').mkdir()
  (root / 'binary' / 'bad.txt').write_bytes(b'\xff\xfe\x00\x81 not text')
  (root / 'small').mkdir()
  for i in range(3):
    (root / 'small' / f'{i}.txt').write_text(f'x = {i}\n')
  return root


CASES = {
    'unknown config argument': (['--config=configs/tiny.py:vea'],
                                'unknown config argument'),
    'unknown field': (['--config=configs/tiny.py:vae,hiden=3'], 'unknown config field'),
    'hidden % heads': (['--config=configs/tiny.py:vae', '--config.vae.hidden_size=130'],
                       'not divisible by vae.num_heads'),
    'heads % kv heads': (['--config=configs/tiny.py:vae', '--config.dit.num_kv_heads=3'],
                         'not divisible by dit.num_kv_heads'),
    'max_length % chunk': (['--config=configs/tiny.py:vae', '--config.max_length=66'],
                           'not divisible by chunk_size'),
    'glob matches nothing': (['--config=configs/tiny.py:vae',
                              '--config.data.source=files:/nonexistent/*.txt'],
                             'matches no files'),
    'stage 2 without a VAE': (['--config=configs/tiny.py:diffusion',
                               '--config.vae_workdir=/nonexistent/vae'],
                              "'/nonexistent/vae' has no checkpoints"),
    'unknown flag': (['--config=configs/tiny.py:vae', '--stpes=3'], "'stpes'"),
    'config syntax error': (['--config=tests/data/broken_config.py:vae'],
                            "broken_config.py, line 3: '(' was never closed (fix the config file)"),
}


@pytest.mark.parametrize('case', list(CASES))
def test_config_and_flag_errors(case, tmp_path):
  args, message = CASES[case]
  assert_one_line_error(train(*args, f'--workdir={tmp_path}/run'), message)


def test_non_utf8_files_are_named_and_skipped(corpora, tmp_path):
  out = train('--config=configs/tiny.py:vae',
              f'--config.data.source=files:{corpora}/binary/*.txt',
              f'--config.data.cache_dir={tmp_path}/cache', f'--workdir={tmp_path}/r')
  assert 'skipping' in out.stderr and 'bad.txt: not UTF-8' in out.stderr
  assert_one_line_error(out, 'has 0 windows')  # nothing else left to train on


def test_corpus_smaller_than_a_batch(corpora, tmp_path):
  out = train('--config=configs/tiny.py:vae,tokenizer=bpe:300',
              f'--config.data.source=files:{corpora}/small/*.txt',
              f'--config.data.cache_dir={tmp_path}/cache', f'--workdir={tmp_path}/r')
  assert_one_line_error(out, 'fewer than one batch of 32')


def test_hub_tokenizer_and_dataset_offline(tmp_path):
  offline = {'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1',
             'HF_HOME': str(tmp_path / 'hf')}  # an empty cache
  out = train('--config=configs/tiny.py:vae',
              '--config.tokenizer=meta-llama/CodeLlama-7b-hf',
              f'--workdir={tmp_path}/r', env=offline)
  assert_one_line_error(out, 'configs/tiny.py')
  out = train('--config=configs/tiny.py:vae',
              '--config.data.source=hf:wikitext:wikitext-2-raw-v1',
              f'--workdir={tmp_path}/r2', env=offline)
  assert_one_line_error(out, "cannot load dataset 'wikitext'")


def test_verbose_shows_the_traceback(tmp_path):
  out = train('--config=configs/tiny.py:vae', '--config.max_length=66', '--verbose',
              f'--workdir={tmp_path}/run')
  assert out.returncode != 0 and 'Traceback' in out.stderr
  # The environment variable does the same, for errors found while parsing flags too.
  out = train('--config=configs/tiny.py:vea', f'--workdir={tmp_path}/run',
              env={'TOKCOM_JAX_VERBOSE': '1'})
  assert out.returncode != 0 and 'Traceback' in out.stderr
  assert not (tmp_path / 'run').exists()


def test_memory_report_mesh_and_config_errors():
  run = lambda *args: subprocess.run(
      [sys.executable, '-m', 'tokcom_jax.memory', '--config=configs/tiny.py:vae',
       '--no_compile', *args], capture_output=True, text=True, cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert_one_line_error(run('--mesh=2by4'), 'write DATAxFSDP')
  assert_one_line_error(run('--mesh=1x1', '--config.train.batch_size=0'),
                        'train.batch_size=0: must be a positive integer')
