"""The generation-recipe ablation: every variant trained with the same budget on the
embedded default, evaluated the same way, one table.

    python benchmarks/quality.py                          # every variant below
    python benchmarks/quality.py --variants std,std_sc    # some of them
    python benchmarks/quality.py --write benchmarks/RESULTS.md

A variant is a pair of config modifiers (`configs/tiny.py` arguments) for stage 1 and
stage 2. Stage-1 runs are shared by the variants with the same VAE recipe; every run
lives in --root and is resumed (or reused when finished), so the command can be
stopped and started again. Each flow run is evaluated by `tokcom_jax.evaluate`
against the reference `ar` run (trained first if missing), and one row per variant
gives: validation CE at fixed t, sample perplexity under the reference with unigram
entropy, chunk validity, VAE decodability at 0.5σ latent noise, and the stage-2 wall
time (stage 1 is shared; the default VAE is --default_vae, runs/tiny/vae).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name → (VAE modifiers, flow modifiers). '' is the tiny config as it is.
V52 = 'noise_std=0.05,t_schedule=uniform,t_shift=1.0,sample_shift=1.0,ce_weight=1.0,' \
      'ce_min_t=0.0,standardize=False,self_condition=False'
STD = 'standardize=True,noise_std=1.0,ce_weight=0.0,self_condition=False,t_shift=1.0'
ROBUST_VAE = 'latent_noise=0.3,token_dropout=0.1'
NORM64 = 'latent_dim=64,normalize_latent=True,latent_noise=0.5'
HEAD_VAE = 'order=head,self_condition=False'
HEAD = STD + ',order=head,steps=16,noise_scale=0.35'
HEADL = HEAD + ',head.input=latent'
VARIANTS = {
    'v52': ('', V52),
    'v52_mse': ('', V52 + ',ce_weight=0.0'),
    'std': ('', STD),
    'std_shift3': ('', STD + ',t_shift=3.0'),
    'std_sc': ('', STD + ',self_condition=True'),
    'std_sc_ce': ('', STD + ',self_condition=True,ce_weight=0.1,ce_min_t=0.7'),
    'robust_std_sc': (ROBUST_VAE, STD + ',self_condition=True'),
    'norm_robust_std_sc': ('normalize_latent=True,latent_noise=0.4,token_dropout=0.1',
                           STD + ',self_condition=True'),
    'norm_mild_std_sc': ('normalize_latent=True,latent_noise=0.2,token_dropout=0.05',
                         STD + ',self_condition=True'),
    'norm64_std_sc': (NORM64, STD + ',self_condition=True'),
    'ardec_norm64_std_sc': (NORM64 + ',autoregressive_decoder=True',
                            STD + ',self_condition=True'),
    'norm64_std_sc_6k': (NORM64, STD + ',self_condition=True,'
                                 'train.diffusion.num_steps=6000'),
    # Chunks one after another, each from the clean chunks before it (flow.order).
    'chunkwise': (NORM64, STD + ',self_condition=True,order=chunkwise'),
    # The chunkwise default on a VAE trained with a latent prior (vae.prior_weight):
    # the flow's loss shapes the latent space in stage 1.
    'prior1_chunkwise': (NORM64 + ',prior_weight=1.0',
                         STD + ',self_condition=True,order=chunkwise'),
    'prior01_chunkwise': (NORM64 + ',prior_weight=0.1',
                          STD + ',self_condition=True,order=chunkwise'),
    'prior03_chunkwise': (NORM64 + ',prior_weight=0.3',
                          STD + ',self_condition=True,order=chunkwise'),
    'prior05_chunkwise': (NORM64 + ',prior_weight=0.5',
                          STD + ',self_condition=True,order=chunkwise'),
    # The chunk generator (flow.order=head): a trunk run once per chunk reading the
    # previous chunk's tokens, a flow head (x1, 3 blocks of 256, batch_mul 4); its
    # VAE trained with the same generator as latent prior. `@<flags>` after a name:
    # evaluation flags only (the same runs, sampled otherwise).
    'head': (HEAD_VAE, HEAD),
    'head_tokenloss1': (HEAD_VAE, HEAD + ',head.token_loss=1.0'),
    'head_latent_input': (HEAD_VAE, HEAD + ',head.input=latent'),
    'head_velocity': (HEAD_VAE, HEAD + ',head.predict=velocity'),
    'head_energy': (HEAD_VAE, HEAD + ',head.kind=energy,head.batch_mul=8'),
    'head_batch_mul1': (HEAD_VAE, HEAD + ',head.batch_mul=1'),
    'head_self_condition': (HEAD_VAE, HEAD + ',self_condition=True'),
    'head_width128': (HEAD_VAE, HEAD + ',head.width=128'),
    'head_blocks6': (HEAD_VAE, HEAD + ',head.blocks=6'),
    'head_no_prior': (HEAD_VAE + ',prior_weight=0.0', HEAD),
    # The same around the latent input (it measured ahead of the token input).
    'headl_width128': (HEAD_VAE, HEADL + ',head.width=128'),
    'headl_separate': (HEAD_VAE, HEADL + ',head.condition=separate'),
    'headl_self_condition': (HEAD_VAE, HEADL + ',self_condition=True'),
    'headl_tokenloss1': (HEAD_VAE, HEADL + ',head.token_loss=1.0'),
    'headl_no_prior': (HEAD_VAE + ',prior_weight=0.0', HEADL),
    # Latent input in both stages: the VAE's prior reads latents too.
    'headl_latent_prior': (HEAD_VAE + ',head.input=latent', HEADL),
    # Shortcut heads: steps of 2/S … 1 learned from the head's own steps of 1/S.
    'headl_shortcut16': (HEAD_VAE, HEADL + ',head.shortcut_from=16'),
    'headl_shortcut8': (HEAD_VAE, HEADL + ',head.shortcut_from=8'),
    'headl_shortcut4': (HEAD_VAE, HEADL + ',head.shortcut_from=4'),
    # Fewer, wider blocks: at batch 1 a head step costs its kernels, not its FLOPs.
    'headl_blocks1_width512': (HEAD_VAE, HEADL + ',head.blocks=1,head.width=512'),
    'headl_blocks2': (HEAD_VAE, HEADL + ',head.blocks=2'),
    'headl_blocks1': (HEAD_VAE, HEADL + ',head.blocks=1'),
}


def run(cmd: list[str], log: str) -> float:
  start = time.perf_counter()
  with open(log, 'a') as f:
    subprocess.run(cmd, check=True, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
  return time.perf_counter() - start


def config_arg(stage: str, modifiers: str) -> str:
  return 'configs/tiny.py:' + ','.join(p for p in (stage, modifiers) if p)


def train(stage: str, modifiers: str, workdir: str, extra=()) -> float:
  os.makedirs(workdir, exist_ok=True)
  return run([sys.executable, 'train.py', f'--config={config_arg(stage, modifiers)}',
              f'--workdir={workdir}', *extra], os.path.join(workdir, 'train.log'))


def evaluate(workdir: str, reference: str, num_samples: int, seed: int = 0,
             flags=()) -> dict:
  out = subprocess.run(
      [sys.executable, '-m', 'tokcom_jax.evaluate', f'--workdir={workdir}',
       f'--reference={reference}', f'--num_samples={num_samples}', f'--seed={seed}',
       *flags], check=True, cwd=REPO, capture_output=True, text=True)
  return json.loads(out.stdout)


def mean(values):
  return sum(values) / len(values)


def row(name: str, results: list[dict], seconds: float) -> dict:
  """One variant's row: generation measures averaged over the evaluation seeds."""
  result = results[0]
  q = result['generation_quality']['rows']
  tokcom = lambda key: mean([r['generation_quality']['rows']['tokcom'][key]
                             for r in results])
  extra = {k: result[k] for k in ('val_mse_own_context', 'val_mse_other_context',
                                  'val_next_chunk_accuracy', 'val_mse',
                                  'brier', 'ar_brier', 'steps', 'noise_scale')
           if k in result}
  return {'variant': name, 'val_ce': result['val_ce'], 'seeds': len(results),
          'perplexity': tokcom('perplexity'),
          'entropy': tokcom('unigram_entropy'),
          'chunk_validity': tokcom('chunk_validity'), **extra,
          'decodability_0.5': result['recon_token_accuracy_at_noise']['0.5'],
          'clean_token_accuracy': result['recon_token_accuracy'],
          'train_seconds': seconds, 'real': q['real'], 'shuffled': q['shuffled'],
          'ar': q['ar']}


def markdown(rows: list[dict]) -> str:
  ref = rows[0]
  lines = [
      f'Reference rows: real text perplexity {ref["real"]["perplexity"]:.1f}, entropy'
      f' {ref["real"]["unigram_entropy"]:.2f}, chunk validity'
      f' {ref["real"]["chunk_validity"]:.3f}; shuffled words'
      f' {ref["shuffled"]["perplexity"]:.1f} / {ref["shuffled"]["unigram_entropy"]:.2f}'
      f' / {ref["shuffled"]["chunk_validity"]:.3f}; AR samples'
      f' {ref["ar"]["perplexity"]:.1f} / {ref["ar"]["unigram_entropy"]:.2f} /'
      f' {ref["ar"]["chunk_validity"]:.3f}.', '',
      '| variant | val CE t=0.1 / 0.5 / 0.9 | sample perplexity | entropy (bits) |'
      ' chunk validity | VAE token acc. clean / 0.5σ | flow train wall (s) |',
      '|---|---|---|---|---|---|---|']
  for r in rows:
    ce = ' / '.join(f'{v:.3f}' for v in r['val_ce'].values())
    lines.append(
        f'| {r["variant"]} | {ce} | {r["perplexity"]:.1f} | {r["entropy"]:.2f} |'
        f' {r["chunk_validity"]:.3f} | {r["clean_token_accuracy"]:.4f} /'
        f' {r["decodability_0.5"]:.3f} | {r["train_seconds"]:.0f} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--root', default='runs/quality')
  parser.add_argument('--reference', default='runs/tiny/ar',
                      help='the ar run that scores samples (trained if missing)')
  parser.add_argument('--num_samples', type=int, default=64)
  parser.add_argument('--seeds', default='0', help='evaluation seeds, e.g. 0,1,2: the'
                      ' generation measures are their means')
  parser.add_argument('--default_vae', default='runs/tiny/vae',
                      help='the stage-1 run of variants with the default VAE recipe')
  parser.add_argument('--write', default=None, help='append the table to this file')
  parser.add_argument('--set', default='', help='modifiers for every run, e.g. a second'
                      " corpus: data.source='files:~/.cache/tokcom_jax/prose/*.txt'"
                      ' (benchmarks/prose_corpus.py) with its own --root, --reference'
                      ' and --default_vae')
  args = parser.parse_args()
  both = lambda mods: ','.join(p for p in (mods, args.set) if p)
  if not os.path.isdir(os.path.join(REPO, args.reference, 'checkpoints')):
    train('ar', both(''), os.path.join(REPO, args.reference))
  rows = []
  for name in args.variants.split(','):
    name, _, eval_flags = name.partition('@')  # e.g. head@steps=4
    vae_mods, flow_mods = VARIANTS[name]
    vae_dir = (os.path.join(args.root, 'vae-' + vae_mods.replace('=', '').replace(
        ',', '-')) if vae_mods else args.default_vae)
    train('vae', both(vae_mods), vae_dir)  # reused when finished
    dit_dir = os.path.join(args.root, name)
    seconds = train('diffusion', both(','.join(p for p in (vae_mods, flow_mods) if p)),
                    dit_dir, [f'--config.vae_workdir={vae_dir}'])
    flags = [f'--{f}' for f in eval_flags.split('+') if f]
    results = [evaluate(dit_dir, args.reference, args.num_samples, int(seed), flags)
               for seed in args.seeds.split(',')]
    rows.append(row(name + ('@' + eval_flags if eval_flags else ''), results, seconds))
    print(json.dumps(rows[-1]), flush=True)
  table = markdown(rows)
  print(table)
  if args.write:
    with open(args.write, 'a') as f:
      f.write(f'\n### Generation-recipe ablation, {datetime.date.today()}\n\n'
              f'`python benchmarks/quality.py --variants {args.variants}`\n\n'
              + table + '\n')


if __name__ == '__main__':
  main()
