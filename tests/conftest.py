import os
import sys

# Tests run on the CPU, whatever the machine has, and import the repo's packages.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pytest  # noqa: E402


@pytest.fixture(scope='session')
def runs(tmp_path_factory):
  """(vae_workdir, diffusion_workdir) of trained micro runs, shared by the session."""
  from tests import train_fixtures
  return train_fixtures.train_sampling_runs(tmp_path_factory.mktemp('sampling'))


@pytest.fixture(scope='session')
def ar_run(runs):
  """A trained micro `ar` run beside the sampling runs."""
  from tests import train_fixtures
  return train_fixtures.train_ar_run(runs)
