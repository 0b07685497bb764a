"""Training FLOPs of every stage, and the autoregressive run that matches TokCom's.

    python benchmarks/equal_compute.py --config configs/tiny.py
    python benchmarks/equal_compute.py --config configs/v52.py

TokCom's training compute is stage 1 (the VAE) plus stage 2 (the flow model, with the
frozen VAE inside every step). The autoregressive baseline is fair when it gets the
same compute: this prints each stage's model FLOPs per step (`Stage.train_flops`,
counted as in `tokcom_jax.models.flops`), the steps each is configured for, and the
`train.ar.num_steps` at which the AR stage spends what VAE + flow spend together,
with the command that trains it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokcom_jax import stages  # noqa: E402


def load_config(path: str, stage: str):
  spec = importlib.util.spec_from_file_location('config_module', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(stage)


def stage_steps(config, name: str) -> int:
  sc = config.train[name]
  if sc.num_steps > 0:
    return sc.num_steps
  raise SystemExit(f'error: train.{name} is set by epochs; give num_steps to compare.')


def report(config_path: str) -> dict:
  rows, total = {}, 0
  for name in ('vae', 'diffusion', 'ar'):
    config = load_config(config_path, name)
    flops_per_step = stages.get(config).train_flops(config.train.batch_size)
    steps = stage_steps(config, name)
    rows[name] = {'flops_per_step': flops_per_step, 'steps': steps,
                  'total_flops': flops_per_step * steps}
    if name != 'ar':
      total += flops_per_step * steps
  ar_steps = round(total / rows['ar']['flops_per_step'])
  return {'config': config_path, 'stages': rows, 'tokcom_total_flops': total,
          'ar_steps_for_equal_flops': ar_steps,
          'ar_over_tokcom_at_configured_steps': rows['ar']['total_flops'] / total,
          'command': f'python train.py --config {config_path}:ar'
                     f' --config.train.ar.num_steps={ar_steps}'}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='configs/tiny.py')
  out = report(parser.parse_args().config)
  print(json.dumps(out, indent=2))


if __name__ == '__main__':
  main()
