"""The JSON lines of train_step.py, sampling.py and a training log as Markdown tables
for RESULTS.md (benchmarks/accelerator.sh prints them).

    python benchmarks/markdown.py train.jsonl sampling.jsonl [--smoke metrics.jsonl]
"""

from __future__ import annotations

import argparse
import json


def rows(path: str) -> list[dict]:
  out = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line.startswith('{'):
        out.append(json.loads(line))
  return out


def table(header: list[str], lines: list[list]) -> str:
  fmt = lambda v: f'{v:.4g}' if isinstance(v, float) else str(v)
  return '\n'.join(['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
                   + ['| ' + ' | '.join(map(fmt, line)) + ' |' for line in lines])


def train_table(found: list[dict]) -> str:
  peak = next((r for r in found if r.get('bench') == 'peak'), {})
  steps = [r for r in found if r.get('bench') == 'train_step']
  return (f'Device: {peak.get("device", "?")}; peak {peak.get("flops_per_sec_per_device", 0):.3g}'
          f' FLOP/s per device ({peak.get("source", "?")}).\n\n' + table(
              ['framework', 'config', 'stage', 'dtype', 'batch', 'step (ms)', 'tokens/s',
               'MFU'],
              [[r['framework'], r['config'], r['stage'], r['dtype'], r.get('batch', ''),
                r['step_ms'], r['tokens_per_sec'], r['mfu']] for r in steps]))


def sampling_table(found: list[dict]) -> str:
  return table(
      ['config', 'dtype', 'batch', 'tokens', 'order', 'Euler steps', 'TokCom tokens/s',
       'autoregressive tokens/s', 'TokCom / AR', 'autoregressive'],
      [[r['config'], r['dtype'], r['batch'], r['tokens'], r.get('tokcom_order', 'parallel'),
        r['tokcom_steps'],
        r['tokcom_tokens_per_sec'], r['autoregressive_tokens_per_sec'],
        r['tokcom_over_autoregressive'], r['autoregressive']]
       for r in found if r.get('bench') == 'sampling'])


def smoke_table(found: list[dict], label: str) -> str:
  train = [r for r in found if 'train/loss' in r and 'step' in r]
  if not train:
    return 'smoke run: no training metrics found'
  first, last = train[0], train[-1]
  return table(['smoke run', 'first step', 'loss', 'last step', 'loss'],
               [[label, first['step'], float(first['train/loss']), last['step'],
                 float(last['train/loss'])]])


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('train')
  p.add_argument('sampling')
  p.add_argument('--smoke', default=None, help="a smoke run's metrics.jsonl")
  p.add_argument('--smoke_label', default='v5.2-shaped stage 1')
  args = p.parse_args()
  parts = [train_table(rows(args.train)), sampling_table(rows(args.sampling))]
  if args.smoke:
    parts.append(smoke_table(rows(args.smoke), args.smoke_label))
  print('\n\n'.join(parts))


if __name__ == '__main__':
  main()
