"""Sampling speed as a user sees it: `tokcom_jax.load(run).sample(n, batch_size=n)`
with the run's defaults against the `ar` run's, after one warm-up call each, in one
process (tokens/s of whole texts, the transfer to numpy included).

    python benchmarks/api_sampling.py --tokcom runs/tiny/diffusion --ar runs/tiny/ar

One JSON line per batch size; `tokcom_over_ar` > 1 means TokCom is faster.
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401  (the repository on sys.path)

import tokcom_jax


def seconds(fn, repeats: int) -> float:
  fn()  # compile
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - start) / repeats


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--tokcom', default='runs/tiny/diffusion')
  p.add_argument('--ar', default='runs/tiny/ar')
  p.add_argument('--batch_sizes', default='1,8,64')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--steps', type=int, default=None,
                 help="TokCom's sampler steps (default: the run's sample.steps)")
  args = p.parse_args()
  tokcom, ar = tokcom_jax.load(args.tokcom), tokcom_jax.load(args.ar)
  steps = args.steps or tokcom.config.sample.steps
  tc_tokens = tokcom.sample(1, steps=steps)[1].shape[-1]  # a whole window
  ar_tokens = ar.sample(1).shape[-1]  # all its context holds after the first token
  for n in map(int, args.batch_sizes.split(',')):
    t_tc = seconds(lambda: tokcom.sample(n, batch_size=n, steps=steps), args.repeats)
    t_ar = seconds(lambda: ar.sample(n, batch_size=n), args.repeats)
    common.emit({'bench': 'api_sampling', 'batch': n, 'tokcom_tokens': tc_tokens,
                 'ar_tokens': ar_tokens,
                 'tokcom_order': tokcom.config.flow.order,
                 'tokcom_steps': steps,
                 'tokcom_tokens_per_sec': n * tc_tokens / t_tc,
                 'ar_tokens_per_sec': n * ar_tokens / t_ar,
                 'tokcom_over_ar': t_ar / t_tc, 'device': common.device_name()})


if __name__ == '__main__':
  main()
