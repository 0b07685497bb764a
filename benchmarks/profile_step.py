"""Where a train step's time goes: a jax.profiler trace, summed by XLA operation.

    python benchmarks/profile_step.py --config bench --stage vae

Prints the operations that take the most time (one JSON line each) and leaves the
trace in --trace_dir for TensorBoard / Perfetto.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json

import common
import jax

import train_step


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', default='bench')
  p.add_argument('--stage', default='vae')
  p.add_argument('--dtype', default='float32')
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--top', type=int, default=12)
  p.add_argument('--trace_dir', default='/tmp/tokcom_profile')
  args = p.parse_args()
  config = common.get_config(args.config, args.stage, args.dtype)
  one = train_step.build_step(config, args.stage)
  one()  # compile outside the trace
  with jax.profiler.trace(args.trace_dir, create_perfetto_trace=True):
    for _ in range(args.steps):
      one()
  path = sorted(glob.glob(f'{args.trace_dir}/**/*.trace.json.gz', recursive=True))[-1]
  events = json.load(gzip.open(path))['traceEvents']
  totals, count = collections.Counter(), collections.Counter()
  for e in events:
    # Python frames are named "$file:line function"; the rest are XLA's own.
    if e.get('ph') == 'X' and 'dur' in e and not e['name'].startswith('$'):
      totals[e['name']] += e['dur']
      count[e['name']] += 1
  for name, us in totals.most_common(args.top):
    common.emit({'op': name, 'ms_total': us / 1e3, 'calls': count[name]})


if __name__ == '__main__':
  main()
