"""Kill a training run with SIGKILL at random steps, restart it, and check that it
ends bit-identical to an uninterrupted run.

    python -m tokcom_jax.resilience --kills 3 --root /tmp/kill_test -- \\
        --config configs/tiny.py:vae,train.vae.num_steps=200,checkpoint_every=20,log_every=1

Everything after `--` goes to train.py. The uninterrupted run goes to <root>/clean
and the killed one to <root>/killed; the report (one JSON object) says where each
kill landed and whether losses and final parameters are bit-identical. Exit code 0
when they are, 1 when not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np


TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     'train.py')


def logged_steps(workdir: str) -> int:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  steps = [0]
  for line in open(path):
    try:
      steps.append(json.loads(line)['step'])
    except (json.JSONDecodeError, KeyError):
      pass  # a torn last line: exactly what a kill can leave
  return max(steps)


def latest_checkpoint(workdir: str) -> int:
  """The newest whole checkpoint's step (orbax names finished ones by number)."""
  root = os.path.join(workdir, 'checkpoints')
  steps = [int(n) for n in os.listdir(root) if n.isdigit()] if os.path.isdir(root) else []
  return max(steps, default=0)


def losses(workdir: str) -> dict[str, float]:
  """Every loss and eval number by (step, name); timings are left out."""
  out = {}
  for line in open(os.path.join(workdir, 'metrics.jsonl')):
    row = json.loads(line)
    for k, v in row.items():
      if k.startswith(('train/', 'eval/')):
        out[f'{row["step"]}:{k}'] = v
  return out


def final_params(workdir: str):
  from tokcom_jax import config_lib, stages
  from tokcom_jax.storage import checkpoint
  from tokcom_jax.training import sharding, train_state
  step, meta = checkpoint.read_meta(workdir, checkpoint.manager(
      workdir, read_only=True).latest_step())
  config = config_lib.from_dict(meta['config'])
  _, abstract = train_state.abstract_params(stages.get(config, meta['stage']).build,
                                            sharding.make_mesh(-1, 1))
  params, _, _ = checkpoint.restore_params(workdir, abstract, step=step)
  return step, params


def run(train_args: list[str], root: str, kills: int, seed: int = 0,
        timeout: float = 1800) -> dict:
  rng = np.random.default_rng(seed)
  clean, killed = os.path.join(root, 'clean'), os.path.join(root, 'killed')
  cmd = [sys.executable, TRAIN, *train_args]
  subprocess.run(cmd + [f'--workdir={clean}'], check=True, timeout=timeout)
  total = logged_steps(clean)
  report = {'total_steps': total, 'kills': []}
  # Kill targets stay a few steps short of the end: a fast run could otherwise
  # finish between two polls, and there would be nothing left to kill.
  last_target = total - max(2, total // 8)
  for _ in range(kills):
    start = logged_steps(killed)
    if start + 1 >= last_target:
      break
    target = int(rng.integers(start + 1, last_target))
    resume_step = latest_checkpoint(killed)
    proc = subprocess.Popen(cmd + [f'--workdir={killed}'], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while proc.poll() is None and logged_steps(killed) < target and (
        time.time() < deadline):
      time.sleep(0.005)
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    report['kills'].append({'resumed_from': resume_step, 'killed_at': logged_steps(
        killed), 'exit': proc.returncode})
  subprocess.run(cmd + [f'--workdir={killed}'], check=True, timeout=timeout,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  a, b = losses(clean), losses(killed)
  report['losses_identical'] = a == b
  report['losses_compared'] = len(a)
  (sa, pa), (sb, pb) = final_params(clean), final_params(killed)
  import jax
  same = jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))),
                      pa, pb)
  report['final_step'] = [sa, sb]
  report['params_identical'] = sa == sb and all(jax.tree.leaves(same))
  return report


def main(argv):
  from absl import flags
  F = flags.FLAGS
  if len(argv) < 2:
    from tokcom_jax.errors import ConfigError
    raise ConfigError('give train.py flags after --, e.g. -- --config'
                      ' configs/tiny.py:vae,train.vae.num_steps=200')
  from tokcom_jax import cli, config_checks
  config_checks.check_flags(F.flag_values_dict(), cli.RESILIENCE_FLAGS)
  try:
    report = run(argv[1:], F.root, F.kills, F.seed)
  except subprocess.CalledProcessError as e:
    from tokcom_jax.errors import TrainingError
    raise TrainingError(f'train.py exited with code {e.returncode} (its error is'
                        ' above): fix the flags after --.') from None
  print(json.dumps(report))
  sys.exit(0 if report['losses_identical'] and report['params_identical'] else 1)


if __name__ == '__main__':
  from absl import flags

  from tokcom_jax import cli
  flags.DEFINE_integer('kills', 3, 'How many times to SIGKILL the run.')
  flags.DEFINE_string('root', 'runs/resilience', 'Where the two runs go.')
  flags.DEFINE_integer('seed', 0, 'Seed of the kill times.')
  cli.run(main)
