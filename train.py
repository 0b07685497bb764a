"""Trains TokCom: stage 1 (chunk VAE), stage 2 (latent flow model), or both.

  python train.py --config configs/v52.py:vae
  python train.py --config configs/v52.py:diffusion
  python train.py --config configs/tiny.py:all          # offline, 2-core CPU
  python train.py --config configs/v52.py:vae --config.train.batch_size=16

Multi-process off TPU: add --coordinator_address=host:port --num_processes=N
--process_id=i on every process. On a TPU VM pod no flags are needed.
"""

import os
import pathlib

from absl import flags, logging
from ml_collections import config_flags

from tokcom_jax import cli


_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and argument, e.g. configs/v52.py:vae.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory (default runs/<config file stem>/<stage>;'
    ' for stage all, runs/<stem>).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for multi-process runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index.')
flags.mark_flags_as_required(['config'])


def default_workdir(config_path: str, stage: str) -> str:
  stem = pathlib.Path(config_path.split(':')[0]).stem
  return os.path.join('runs', stem) if stage == 'all' else os.path.join('runs', stem, stage)


def main(argv):
  del argv
  from tokcom_jax import config_checks
  config = _CONFIG.value
  workdir = _WORKDIR.value or default_workdir(
      flags.FLAGS['config'].config_filename, config.stage)
  # Every flag and field against its declared range, before JAX starts.
  cli.check_train_flags({**flags.FLAGS.flag_values_dict(), 'workdir': workdir})
  config_checks.check_config(config)
  from tokcom_jax.training import sharding, trainer  # after flags: JAX reads its env first
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value)
  logging.info('workdir %s', workdir)
  trainer.train(config, workdir)


if __name__ == '__main__':
  cli.run(main)
