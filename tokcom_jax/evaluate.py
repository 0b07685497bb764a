"""Evaluates a trained run: the VAE, the flow model, and generated text.

    python -m tokcom_jax.evaluate --workdir runs/tiny/diffusion [--num_samples 64 --steps 50]
    python -m tokcom_jax.evaluate --workdir runs/tiny/diffusion --reference runs/tiny/ar

Prints one JSON object and writes the same to <workdir>/eval.json; plots go to
<workdir>/plots/. All held-out numbers use the validation split the run trained
against (its token cache is reused). A stage-1 (VAE) workdir gets the VAE metrics only.

Metrics:
  recon_token_accuracy, recon_chunk_exact_match   argmax decode of the latent means
  recon_token_accuracy_at_noise[σ]                latents + σ·std·ε, std per dimension
  val_ce[t], val_mse[t]                           stage-2 loss terms at fixed t
  val_mse_own_context, val_mse_other_context      a chunk generator's head MSE (mean
                                                  over t) with its window's trunk
                                                  states, and with another window's
  val_next_chunk_ce / _accuracy                   its trunk's token head (token_loss)
  brier, ar_brier                                 teacher-forced Brier-1..4 and BrierLM
                                                  (tokcom_jax.evaluation.brier) of a
                                                  chunk generator or ar run, and of the
                                                  reference ar run on the same windows
  gen_token_id_entropy, real_token_id_entropy     bits per token of the sampled ids as
                                                  they are (EOS counted), run tokenizer
  gen_distinct_2/3, gen_repeat_4gram_rate         diversity and repetition
  gen_frechet_latent_distance                     generated vs real, encoder latents
  gen_roundtrip_token_accuracy                    decode → encode → decode agreement
  seconds_per_sample                              wall time after compilation
  generation_quality.rows[real|shuffled|tokcom|ar] perplexity under the reference
                                                  `ar` run, unigram entropy of the text
                                                  re-tokenized by the reference, chunk
                                                  validity (tokcom_jax.evaluation.quality)

An `ar` run gets its own samples' generation quality; a diffusion run gets TokCom's
and, beside it, the reference `ar` run's samples (drawn at temperature 1).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
from etils import epath

from tokcom_jax import cli
from tokcom_jax.errors import ConfigError, DataError, SamplingError
from tokcom_jax.storage import files, workdir_lock


def evaluate(workdir: str, num_samples: int = 64, steps: int | None = None,
             num_windows: int = 256, batch_size: int = 32, seed: int = 0,
             reference: str | None = None, vae_workdir: str | None = None,
             noise_scale: float | None = None) -> dict:
  """All metrics of a run; writes eval.json and plots into `workdir` (holding its
  lock), or only returns them when `workdir` cannot be written.

  `reference`: the `ar` run that scores generation quality (default: the newest
  `ar` run beside `workdir`, or `workdir` itself when it is one). `vae_workdir`:
  where a stage-2 run's VAE is, when not where the run recorded it. `noise_scale`:
  the sampler's (default: the run's `sample.noise_scale`); `steps` likewise."""
  if (steps is not None and steps < 1) or num_samples < 1 or num_windows < 1 or batch_size < 1:
    raise SamplingError('--steps, --num_samples, --num_windows and --batch_size must'
                        ' be positive.')
  with workdir_lock.hold(workdir, 'evaluation', create=False, required=False):
    result, samples, plots = _measure(workdir, num_samples, steps, num_windows,
                                      batch_size, seed, reference, vae_workdir,
                                      noise_scale)
    _write(workdir, result, samples, plots)
  return result


def _measure(workdir, num_samples, steps, num_windows, batch_size, seed, reference,
             vae_workdir, noise_scale=None) -> tuple[dict, list[str], dict[str, str]]:
  """(metrics, generated texts, {stage: run} whose loss curves to plot)."""
  from tokcom_jax.data import batches
  from tokcom_jax.evaluation import brier, model_metrics, quality
  from tokcom_jax.inference.autoregressive import AutoregressiveLM
  from tokcom_jax.inference.loading import load
  model = load(workdir, vae_workdir)
  is_ar = isinstance(model, AutoregressiveLM)
  c = model.config
  cli.check_flags_apply(dict(steps=steps, noise_scale=noise_scale,
                             vae_workdir=vae_workdir), c.stage, workdir)
  if reference and c.stage == 'vae':
    raise ConfigError(f'--reference={reference}: {workdir} is a VAE (stage-1) run,'
                      ' which has no samples to score (leave it out).')
  stream = batches.load_token_stream(c.data.source, 'validation', model.tokenizer,
                                  c.data.cache_dir or None, c.data.text_column,
                                  c.data.val_split)
  windows = batches.Windows(stream, c.max_length)
  n = min(num_windows, windows.num_windows)
  if n == 0:
    raise DataError(f'the validation split of {c.data.source} is shorter than one'
                    f' window of {c.max_length} tokens.')
  # Evenly spread over the split, not just its first documents.
  real = windows.get(np.linspace(0, windows.num_windows - 1, n).astype(np.int64))
  logging.info('evaluating %s on %d held-out windows', workdir, n)
  result, samples, texts, plots = {'workdir': str(workdir), 'num_windows': int(n)}, [], {}, []
  if is_ar:
    result['brier'] = brier.ar_brier(model, real, c.chunk_size, batch_size, seed)
    samples = model.generate(num_samples, seed=seed, batch_size=batch_size)
    texts['ar'] = samples
    result.update(num_samples=num_samples, ar_temperature=1.0)
    plots = [('ar', workdir)]
  else:
    result.update(model_metrics.vae_metrics(model, real, batch_size, seed))
    plots = [('vae', model.vae_workdir)]
  if not is_ar and model.dit_params is not None:
    result.update(model_metrics.flow_metrics(model, real, batch_size, seed))
    scale = c.sample.noise_scale if noise_scale is None else noise_scale
    steps = c.sample.steps if steps is None else steps
    gen, samples = model_metrics.generation_metrics(model, real, num_samples, steps,
                                                    batch_size, seed, scale)
    result.update(num_samples=num_samples, steps=steps, noise_scale=scale, **gen)
    if c.flow.order == 'head':  # teacher-forced: the model's own noise (scale 1)
      result['brier'] = brier.tokcom_brier(model, real, batch_size, seed, steps, 1.0)
    texts['tokcom'] = samples
    plots.append(('diffusion', workdir))
  reference = reference or quality.find_reference(workdir)
  if texts and reference:
    ref = model if is_ar and os.path.samefile(reference, workdir) else (
        load(reference))
    if not isinstance(ref, AutoregressiveLM):
      raise SamplingError(f'--reference {reference} is not an ar run: train one with'
                          ' train.py --config …:ar.')
    if 'ar' not in texts:
      texts['ar'] = ref.generate(num_samples, seed=seed, batch_size=batch_size)
      if 'brier' in result and ref.tokenizer.get_vocab() == model.tokenizer.get_vocab():
        result['ar_brier'] = brier.ar_brier(ref, real, c.chunk_size, batch_size, seed)
    real_texts = [model.tokenizer.decode(w.tolist(), skip_special_tokens=True)
                  for w in real[:num_samples]]
    train = batches.load_token_stream(c.data.source, 'train', model.tokenizer,
                                   c.data.cache_dir or None, c.data.text_column,
                                   c.data.train_split)
    result['generation_quality'] = quality.generation_quality(
        {'real': real_texts, 'shuffled': quality.shuffled(real_texts, seed), **texts},
        ref, train, model.tokenizer, c.chunk_size, batch_size)
    logging.warning('generation quality (reference %s):\n%s', reference,
                    quality.markdown_table(result['generation_quality']))
  return result, samples, dict(plots)


def _write(workdir: str, result: dict, samples: list[str], plots: dict[str, str]):
  """Plots, eval.json and eval_samples.jsonl, each whole or not at all; what cannot
  be written (a read-only copy of a run) is named in one warning."""
  from tokcom_jax.evaluation import plots as plotting
  out, failed = epath.Path(workdir), []

  def attempt(write, path, content):
    try:
      return write(path, content)
    except OSError as e:
      failed.append((os.path.relpath(str(path), str(out)), e))

  save = lambda fig, path: attempt(lambda p, f: files.write_figure(f, p), path, fig)
  result['plots'] = plotting.training_plots(
      workdir, plots, result.get('recon_token_accuracy_at_noise'), save)
  if 'generation_quality' in result:
    result['plots'] += [plotting.generation_quality_plot(
        result['generation_quality'], out / 'plots' / 'generation_quality.png', save)]
  result['plots'] = [p for p in result['plots'] if p]
  attempt(files.write_text, out / 'eval.json', json.dumps(result, indent=2))
  if samples:
    attempt(files.write_text, out / 'eval_samples.jsonl', ''.join(
        json.dumps({'sample': i, 'text': t}) + '\n' for i, t in enumerate(samples)))
  if failed:
    logging.warning('could not write %s in %s (%s): the results are printed only.',
                    ', '.join(name for name, _ in failed), workdir,
                    failed[0][1].strerror or failed[0][1])


def main(argv):
  del argv
  from absl import flags

  from tokcom_jax import config_checks
  F = flags.FLAGS
  config_checks.check_flags(F.flag_values_dict(), cli.EVALUATE_FLAGS)
  result = evaluate(F.workdir, F.num_samples, F.steps, F.num_windows, F.batch_size,
                    F.seed, F.reference, F.vae_workdir, F.noise_scale)
  print(json.dumps(result, indent=2))


def _define_flags():
  from absl import flags
  flags.DEFINE_string('workdir', None, 'The run to evaluate: a diffusion run, an ar'
                      ' run, or a VAE run (VAE metrics only).', required=True)
  flags.DEFINE_string('reference', None, 'The ar run that scores generation quality'
                      ' (default: the newest ar run beside --workdir).')
  flags.DEFINE_string('vae_workdir', None, 'Where the VAE of a stage-2 run is, when'
                      ' not where the run recorded it (a moved stage-1 run).')
  flags.DEFINE_integer('num_samples', 64, 'Texts to generate.')
  flags.DEFINE_integer('steps', None, "Euler steps per sample (default: the run's"
                       ' sample.steps).')
  flags.DEFINE_integer('num_windows', 256, 'Held-out windows to evaluate on.')
  flags.DEFINE_integer('batch_size', 32, 'Windows or samples per batch.')
  flags.DEFINE_integer('seed', 0, 'Random seed (noise, t, sampling).')
  flags.DEFINE_float('noise_scale', None, 'The sampler\'s starting noise × this'
                     ' (default: the run\'s sample.noise_scale).')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
