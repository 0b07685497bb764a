"""The autoregressive stage end to end: training, sampling, scoring, CLI."""

import pytest
import json
import os
import subprocess
import sys

import jax
import numpy as np
from flax import nnx

import tokcom_jax
from tokcom_jax.evaluation import quality, text_metrics
from tokcom_jax.inference.autoregressive import AutoregressiveLM


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ar_run_learns_the_corpus_and_logs_like_the_other_stages(ar_run):
  rows = [json.loads(l) for l in open(os.path.join(ar_run, 'metrics.jsonl'))]
  losses = [r['train/loss'] for r in rows if 'train/loss' in r]
  # The micro corpus is two short programs repeated: 200 steps learn it well
  # (chance is a perplexity of 384, the vocabulary).
  assert losses[-1] < losses[0] / 3, losses
  ev = [r for r in rows if 'eval/loss' in r][-1]
  assert ev['eval/perplexity'] < 20
  # Perplexity is logged per batch and averaged: exp(mean CE) ≤ mean exp(CE).
  assert np.exp(ev['eval/ce']) <= ev['eval/perplexity'] * (1 + 1e-6)
  samples = [json.loads(l) for l in open(os.path.join(ar_run, 'samples.jsonl'))]
  assert [s['step'] for s in samples] == [200, 200] and all(
      s['generation'] for s in samples)


def test_perplexity_equals_exp_of_the_mean_ce_computed_by_hand(ar_run):
  model = tokcom_jax.load(ar_run)
  assert isinstance(model, AutoregressiveLM)
  texts = ['import os\nimport sys\n', 'class Point:\n    x = 1\n']
  ids = [model.tokenizer(t, add_special_tokens=False)['input_ids'] for t in texts]
  lm_model = nnx.merge(model.graphdef, model.params)
  hand = []
  for seq in ids:  # one sequence at a time, no padding: EOS, then the tokens
    tokens = np.array([[model.eos] + seq])
    logp = jax.nn.log_softmax(lm_model(tokens)[0, :-1])
    hand.extend(-np.asarray(logp)[np.arange(len(seq)), seq])
  index = text_metrics.ChunkIndex(np.arange(10, dtype=np.uint16), 4)
  scored = quality.score(texts, model, index, model.tokenizer, batch_size=2)
  np.testing.assert_allclose(scored['perplexity'], np.exp(np.mean(hand)), rtol=1e-4)
  ce = model.token_ce(ids, batch_size=1)
  np.testing.assert_allclose(np.concatenate(ce), hand, rtol=1e-4, atol=1e-5)
  # Padding a batch does not change a sequence's scores.
  np.testing.assert_allclose(np.concatenate(model.token_ce(ids, batch_size=2)),
                             hand, rtol=1e-4, atol=1e-5)


def test_generation_keeps_the_prompt_and_is_seeded(ar_run):
  model = tokcom_jax.load(ar_run)
  a = model.generate(3, num_tokens=12, seed=1, prompt='def ')
  assert a == model.generate(3, num_tokens=12, seed=1, prompt='def ')
  assert all(t.startswith('def ') for t in a)
  tokens = model.sample(3, num_tokens=12, seed=1, prompt='def ')
  prompt_ids = model.tokenizer('def ', add_special_tokens=False)['input_ids']
  assert tokens.shape == (3, len(prompt_ids) + 12)
  np.testing.assert_array_equal(tokens[:, :len(prompt_ids)],
                                np.broadcast_to(prompt_ids, (3, len(prompt_ids))))
  assert model.generate(3, num_tokens=12, seed=2, prompt='def ') != a
  greedy = model.sample(2, num_tokens=12, temperature=0.0)
  np.testing.assert_array_equal(greedy[0], greedy[1])  # argmax: no randomness


@pytest.mark.slow
def test_sample_cli_generates_from_an_ar_run(ar_run, tmp_path):
  out = subprocess.run(
      [sys.executable, 'sample.py', f'--workdir={ar_run}', '--prompt=class ',
       '--num_samples=2', '--num_tokens=8', f'--output_file={tmp_path}/s.jsonl'],
      capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 0, out.stderr
  rows = [json.loads(l) for l in open(tmp_path / 's.jsonl')]
  assert [r['sample'] for r in rows] == [0, 1]
  assert all(r['text'].startswith('class ') for r in rows)
  bad = subprocess.run(
      [sys.executable, 'sample.py', f'--workdir={ar_run}', '--mode=encode',
       '--input_text=x'], capture_output=True, text=True, cwd=REPO)
  assert bad.returncode == 2 and 'only --mode generate' in bad.stderr
  assert len(bad.stderr.strip().splitlines()) == 1
