"""Does TokCom's gap to the AR stage close with compute? Both trained at several
budgets of equal total training FLOPs, each point measured the same way.

    python benchmarks/scaling.py                       # the stdlib, ~2 h on 2 cores
    python benchmarks/scaling.py --root runs/scaling_prose --set \\
        "data.source='files:~/.cache/tokcom_jax/prose/*.txt'"  # a second corpus
    python benchmarks/scaling.py --quick               # toy budgets, a minute

The budget axis is training steps (the tiny config's shapes, batch 32): TokCom's
default (VAE + chunk generator) trains `b` steps per stage for each budget `b`, and
the AR stage gets the steps at which it spends what the two stages spend together
(`Stage.train_flops`, as in benchmarks/equal_compute.py). Steps rather than width:
one architecture, so the curve isolates compute; the tiny widths already fill the
2-core budget at the largest point.

Each point: teacher-forced BrierLM-1..4 (`tokcom_jax.evaluation.brier`), sample
perplexity under one fixed reference (the largest AR run, trained first), unigram
entropy and chunk validity (means over `--seeds` × `--num_samples`), sampling
tokens/s at batch 1 (`sample(1)` after a warm-up), training wall time. One JSON line
per (model, budget) in `--out`; a point already there is skipped (a stopped sweep
resumes; a half-trained run resumes from its checkpoint). Then `--plot` (quality
against training FLOPs, log x, real and shuffled text as horizontal lines) and the
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import common  # noqa: F401  (the repository on sys.path)
import numpy as np
from tqdm import tqdm

from configs import tiny
from tokcom_jax import config_checks, evaluate, stages
from tokcom_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --quick: micro shapes on the stdlib, two toy budgets.
QUICK = ('tokenizer=bpe:384,vocab_size=384,max_length=32,batch_size=8,'
         'vae.hidden_size=32,vae.encoder_layers=1,vae.decoder_layers=1,vae.num_heads=2,'
         'vae.num_kv_heads=1,vae.intermediate_size=64,vae.latent_dim=8,'
         'dit.hidden_size=32,dit.num_layers=1,dit.num_heads=2,dit.num_kv_heads=1,'
         'dit.intermediate_size=64,head.width=32,ar.hidden_size=32,ar.num_layers=1,'
         'ar.num_heads=2,ar.num_kv_heads=1,ar.intermediate_size=64,eval_batches=2,'
         'warmup_steps=1,log_every=1')


def config(stage: str, steps: int, modifiers: str):
  c = tiny.get_config(','.join(p for p in (stage, modifiers) if p))
  c.unlock()
  c.train[stage].num_steps, c.train[stage].epochs = steps, 0
  # The generator as the sweep measured it (RESULTS.md): flow matching alone, its
  # samples in 8 head steps (no reflow phase).
  c.train.reflow.num_steps, c.train.reflow.epochs, c.sample.steps = 0, 0, 8
  c.lock()
  config_checks.check_config(c)
  return c


def flops_per_step(stage: str, modifiers: str) -> int:
  c = config(stage, 1, modifiers)
  return stages.get(c).train_flops(c.train.batch_size)


def train(stage: str, steps: int, modifiers: str, workdir: str, vae_workdir=None
          ) -> float:
  """Trains (or resumes, or finds finished) a run; its wall seconds, kept beside it."""
  record = os.path.join(workdir, 'train_seconds.json')
  if os.path.exists(record):
    return json.load(open(record))['seconds']
  c = config(stage, steps, modifiers)
  if vae_workdir:
    c.unlock()
    c.vae_workdir = vae_workdir
    c.lock()
  start = time.perf_counter()
  trainer.train(c, workdir)
  seconds = time.perf_counter() - start
  with open(record, 'w') as f:
    json.dump({'seconds': seconds}, f)
  return seconds


def tokens_per_second(workdir: str, repeats: int = 3) -> float:
  import tokcom_jax
  model = tokcom_jax.load(workdir)
  tokens = model.sample(1)
  tokens = tokens[-1] if isinstance(tokens, tuple) else tokens  # TokCom: (z, ids)
  start = time.perf_counter()
  for _ in range(repeats):
    model.sample(1)
  return tokens.size * repeats / (time.perf_counter() - start)


def measure(model: str, run: str, reference: str, seeds, num_samples: int,
            num_windows: int) -> dict:
  results = [evaluate.evaluate(run, num_samples=num_samples, seed=s, reference=reference,
                               num_windows=num_windows) for s in seeds]
  rows = [r['generation_quality']['rows'] for r in results]
  name = 'tokcom' if model == 'tokcom' else 'ar'
  mean = lambda row, k: float(np.mean([r[row][k] for r in rows]))
  out = {k: mean(name, k) for k in ('perplexity', 'unigram_entropy', 'chunk_validity')}
  for row in ('real', 'shuffled'):
    out[row] = {k: mean(row, k) for k in ('perplexity', 'unigram_entropy',
                                         'chunk_validity')}
  out['brier'] = results[0]['brier']
  out['val'] = {k: results[0][k] for k in ('val_mse', 'val_ce', 'eval_ce', 'val_loss')
                if k in results[0]}
  return out


def sweep(args) -> list[dict]:
  budgets = [int(b) for b in args.budgets.split(',')]
  fps = {s: flops_per_step(s, args.set) for s in ('vae', 'diffusion', 'ar')}
  ar_steps = {b: max(1, round(b * (fps['vae'] + fps['diffusion']) / fps['ar']))
              for b in budgets}
  runs = {('ar', b): os.path.join(args.root, f'ar_{b}') for b in budgets}
  runs.update({('tokcom', b): os.path.join(args.root, f'tokcom_{b}') for b in budgets})
  reference = runs[('ar', max(budgets))]
  done = {}
  if os.path.exists(args.out):
    for line in open(args.out):
      if line.strip():
        row = json.loads(line)
        done[(row['model'], row['budget'])] = row
  # The reference first, then the rest from the smallest budget up.
  order = [('ar', max(budgets))] + [(m, b) for b in budgets for m in ('ar', 'tokcom')
                                    if (m, b) != ('ar', max(budgets))]
  bar = tqdm(order, desc='scaling', unit='point')
  for model, b in bar:
    if (model, b) in done:
      continue
    bar.set_postfix_str(f'{model} {b}')
    run = runs[(model, b)]
    if model == 'ar':
      seconds = train('ar', ar_steps[b], args.set, run)
      flops = fps['ar'] * ar_steps[b]
    else:
      vae = os.path.join(run, 'vae')
      seconds = train('vae', b, args.set, vae)
      run = os.path.join(run, 'diffusion')
      seconds += train('diffusion', b, args.set, run, vae_workdir=vae)
      flops = (fps['vae'] + fps['diffusion']) * b
    row = {'model': model, 'budget': b, 'steps': ar_steps[b] if model == 'ar' else b,
           'train_flops': flops, 'train_seconds': seconds, 'run': run,
           'reference': reference, 'seeds': args.seeds,
           'num_samples': args.num_samples,
           **measure(model, run, reference, [int(s) for s in args.seeds.split(',')],
                     args.num_samples, args.num_windows),
           'tokens_per_sec_batch1': tokens_per_second(run)}
    done[(model, b)] = row
    with open(args.out, 'a') as f:
      f.write(json.dumps(row) + '\n')
  return sorted(done.values(), key=lambda r: (r['model'], r['budget']))


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  panels = [('perplexity', 'sample perplexity (reference: largest AR run)', True),
            ('chunk_validity', 'chunk validity', False),
            ('unigram_entropy', 'unigram entropy (bits)', False),
            ('brier_lm', 'BrierLM (teacher-forced)', False)]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
  for ax, (key, title, log_y) in zip(axes, panels):
    for model, style in (('ar', 'o-'), ('tokcom', 's-')):
      points = [r for r in rows if r['model'] == model]
      value = lambda r: r['brier']['brier_lm'] if key == 'brier_lm' else r[key]
      ax.plot([r['train_flops'] for r in points], [value(r) for r in points], style,
              label={'ar': 'AR stage', 'tokcom': 'TokCom'}[model])
    if key != 'brier_lm':
      for row, color in (('real', 'green'), ('shuffled', 'gray')):
        ax.axhline(float(np.mean([r[row][key] for r in rows])), color=color,
                   linestyle='--', linewidth=1, label=f'{row} text')
    ax.set_xscale('log')
    if log_y:
      ax.set_yscale('log')
    ax.set_xlabel('training FLOPs')
    ax.set_title(title, fontsize=10)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def table(rows: list[dict]) -> str:
  lines = ['| budget (steps per stage) | training FLOPs | model | steps | perplexity |'
           ' entropy | chunk validity | BrierLM | tokens/s at batch 1 | train wall (s) |'
           ' TokCom / AR perplexity |', '|---|---|---|---|---|---|---|---|---|---|---|']
  ar = {r['budget']: r for r in rows if r['model'] == 'ar'}
  for r in sorted(rows, key=lambda r: (r['budget'], r['model'])):
    ratio = (f'{r["perplexity"] / ar[r["budget"]]["perplexity"]:.2f}'
             if r['model'] == 'tokcom' and r['budget'] in ar else '')
    lines.append(
        f'| {r["budget"]} | {r["train_flops"]:.2e} | {r["model"]} | {r["steps"]} |'
        f' {r["perplexity"]:.1f} | {r["unigram_entropy"]:.2f} |'
        f' {r["chunk_validity"]:.3f} | {r["brier"]["brier_lm"]:.2f} |'
        f' {r["tokens_per_sec_batch1"]:.0f} | {r["train_seconds"]:.0f} | {ratio} |')
  return '\n'.join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--budgets', default=None, help="TokCom's training steps per stage,"
                 ' one point each (default 250,500,1000,2000; --quick: 4,8)')
  p.add_argument('--root', default='runs/scaling')
  p.add_argument('--out', default=None, help='default: <root>/scaling.jsonl')
  p.add_argument('--plot', default='benchmarks/scaling.png')
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--num_samples', type=int, default=64)
  p.add_argument('--num_windows', type=int, default=256,
                 help='held-out windows for BrierLM and the validation losses')
  p.add_argument('--set', default='', help="config modifiers for every run, e.g. a"
                 " second corpus: data.source='files:…'")
  p.add_argument('--quick', action='store_true', help='micro shapes, budgets 4,8')
  run(p.parse_args())


def run(args) -> list[dict]:
  if args.quick:
    args.budgets, args.seeds, args.num_samples = args.budgets or '4,8', '0', 8
    args.num_windows = 16
    args.set = ','.join(p for p in (QUICK, args.set) if p)
  args.budgets = args.budgets or '250,500,1000,2000'
  args.out = args.out or os.path.join(args.root, 'scaling.jsonl')
  os.makedirs(args.root, exist_ok=True)
  rows = sweep(args)
  plot(rows, args.plot)
  print(table(rows))
  return rows


if __name__ == '__main__':
  main()
