import os
import sys

# Tests run on the CPU, whatever the machine has, and import the repo's packages.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for the tests and every subprocess they start
# (train.py, sample.py, evaluate): the same micro models compile once, not per
# process. Results do not depend on it; only compile time does.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    os.path.expanduser('~'), '.cache', 'tokcom_jax', 'jax_test_compilation_cache'))
# Every program, however small: each subprocess otherwise recompiles dozens of them.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
# The tests compile hundreds of tiny programs that run for microseconds: LLVM's
# optimization passes are most of their compile time (about 30% of a training test's
# wall time), so the tests and their subprocesses skip them. Results are checked with
# tolerances that hold at any optimization level; benchmarks run optimized code.
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_backend_optimization_level=0').strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pytest  # noqa: E402


@pytest.fixture(scope='session')
def corpus(tmp_path_factory):
  """(source, cache_dir): one micro corpus of standard-library files for the whole
  session, tokenized once (its cache is shared by every run that reads it)."""
  from tests import train_fixtures
  root = tmp_path_factory.mktemp('corpus')
  return train_fixtures.make_corpus(root / 'text'), str(root / 'cache')


@pytest.fixture(scope='session')
def vae_run(corpus, tmp_path_factory):
  """An uninterrupted 8-step micro VAE run on `corpus` (samples at its end), shared
  by the tests that compare other runs with it."""
  from tests import train_fixtures
  from tokcom_jax.training import trainer as trainer_lib
  workdir = str(tmp_path_factory.mktemp('runs') / 'vae')
  trainer_lib.Trainer(train_fixtures.micro_config(*corpus, sample_every=1), workdir).run()
  return workdir


@pytest.fixture(scope='session')
def runs(tmp_path_factory):
  """(vae_workdir, diffusion_workdir) of trained micro runs, shared by the session."""
  from tests import train_fixtures
  return train_fixtures.train_sampling_runs(tmp_path_factory.mktemp('sampling'))


@pytest.fixture(scope='session')
def head_run_dir(runs):
  """A micro stage-2 run of the chunk generator (flow.order='head', the tiny
  default's) on the sampling VAE: its teacher in <workdir>/teacher, then reflow."""
  from tests import train_fixtures
  return train_fixtures.train_head_run(runs)


@pytest.fixture(scope='session')
def ar_run(runs):
  """A trained micro `ar` run beside the sampling runs."""
  from tests import train_fixtures
  return train_fixtures.train_ar_run(runs)


# ------------------------------------------- end-to-end processes beside the others


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'background(job=…): the test checks what `job` (tests/background.py)'
      ' returns; the job starts with the session and the test runs last')


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
  """Tests of background jobs last, so that their jobs run while the others do."""
  items[:] = sorted(items, key=lambda item: item.get_closest_marker('background')
                    is not None)


@pytest.fixture(scope='session', autouse=True)
def _background_jobs(request, tmp_path_factory):
  from tests import background as background_lib
  jobs = [m.kwargs['job'] for item in request.session.items
          for m in item.iter_markers('background')]
  if jobs:
    background_lib.start(jobs, tmp_path_factory.mktemp,
                         request.getfixturevalue('corpus'))
  yield
  background_lib.stop()


@pytest.fixture
def background(request, tmp_path_factory):
  """background(job): what the background job returned (run now if not started)."""
  from tests import background as background_lib
  return lambda job: background_lib.result(
      job, tmp_path_factory.mktemp, request.getfixturevalue('corpus'))
