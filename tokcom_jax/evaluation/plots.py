"""The plots of an evaluation, as PNGs: each stage's loss curves, the decodability
curve (token accuracy against latent noise), and generation quality (perplexity
against entropy, one point per set of texts).

Each function takes `save(fig, path)`, which writes a figure and returns where (None
when it could not): `tokcom_jax.storage.files.write_figure` by default.
"""

from __future__ import annotations

import os

from etils import epath

from tokcom_jax.storage import files
from tokcom_jax.training import metrics_log


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')  # files only, no display
  import matplotlib.pyplot as plt
  return plt


def _read_metrics(workdir: str) -> list[dict]:
  return metrics_log.read_rows(epath.Path(workdir) / 'metrics.jsonl')


def training_plots(workdir: str, runs: dict[str, str], curve: dict[str, float] | None,
         save=files.write_figure) -> list[str]:
  """Loss curves of each stage's run and the decodability curve, as PNGs;
  `save(fig, path)` writes each and returns where (None when it could not)."""
  plt = _pyplot()

  out_dir = epath.Path(workdir) / 'plots'
  written = []
  for stage, run in runs.items():
    rows = _read_metrics(run)
    if not rows:
      continue
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (('train/loss', 'train'), ('eval/loss', 'validation')):
      pts = [(r['step'], r[key]) for r in rows if key in r]
      if pts:
        ax.plot(*zip(*pts), label=label, marker='o' if label == 'validation' else None)
    ax.set(xlabel='step', ylabel='loss', yscale='log', title=f'{stage}: {run}')
    ax.legend()
    fig.tight_layout()
    written.append(save(fig, out_dir / f'{stage}_loss.png'))
    plt.close(fig)
  if curve:
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([float(s) for s in curve], list(curve.values()), marker='o')
    ax.set(xlabel='latent noise σ (× per-dimension std)', ylabel='token accuracy',
           ylim=(0, 1.02), title='decodability')
    fig.tight_layout()
    written.append(save(fig, out_dir / 'decodability.png'))
    plt.close(fig)
  return [w for w in written if w]


def generation_quality_plot(quality: dict, path: epath.Path, save=files.write_figure) -> str | None:
  """Perplexity against entropy, one point per set of texts; `save(fig, path)`
  writes it and returns where."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 4))
  for name, r in quality['rows'].items():
    ax.scatter(r['unigram_entropy'], r['perplexity'], s=40)
    ax.annotate(f'{name} ({r["chunk_validity"]:.2f})',
                (r['unigram_entropy'], r['perplexity']),
                textcoords='offset points', xytext=(5, 5))
  ax.set(xlabel='unigram entropy (bits / token)', yscale='log',
         ylabel=f'perplexity under {os.path.basename(quality["reference"])}',
         title='generation quality (chunk validity in brackets)')
  fig.tight_layout()
  written = save(fig, path)
  plt.close(fig)
  return written
