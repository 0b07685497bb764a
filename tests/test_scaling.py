"""benchmarks/scaling.py --quick end to end: both models trained at equal FLOPs,
each point measured and written, the plot, the table, and a stopped sweep resumed."""

import argparse
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))

import scaling  # noqa: E402


@pytest.mark.slow
def test_quick_sweep_writes_every_point_and_resumes(corpus, tmp_path, capsys):
  source, cache = corpus
  args = lambda: argparse.Namespace(
      quick=True, budgets='2', root=str(tmp_path / 'runs'), out=None,
      plot=str(tmp_path / 'scaling.png'), seeds='0', num_samples=8, num_windows=16,
      set=f'data.source={source},data.cache_dir={cache}')
  rows = scaling.run(args())
  table = capsys.readouterr().out
  by_model = {r['model']: r for r in rows}
  assert sorted(by_model) == ['ar', 'tokcom'] and {r['budget'] for r in rows} == {2}
  ar, tokcom = by_model['ar'], by_model['tokcom']
  # Equal compute: the AR stage's steps spend what the two stages spend, to within
  # one of its steps.
  assert abs(ar['train_flops'] - tokcom['train_flops']) <= ar['train_flops'] / ar['steps']
  assert ar['steps'] > 2 and tokcom['steps'] == 2
  for r in rows:
    assert r['reference'] == os.path.join(str(tmp_path / 'runs'), 'ar_2')
    assert r['perplexity'] > 1 and 0 <= r['chunk_validity'] <= 1
    assert 'brier_lm' in r['brier'] and r['tokens_per_sec_batch1'] > 0
    assert r['real']['perplexity'] > 1 and r['shuffled']['perplexity'] > 1
  assert open(tmp_path / 'scaling.png', 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
  assert table.count('\n| 2 |') == 2 and 'TokCom / AR perplexity' in table

  # Stopped after the AR point: the TokCom point is measured again, not retrained.
  out = tmp_path / 'runs' / 'scaling.jsonl'
  lines = open(out).read().splitlines()
  open(out, 'w').write('\n'.join(l for l in lines if '"ar"' in l) + '\n')
  seconds = json.load(open(tmp_path / 'runs' / 'tokcom_2' / 'diffusion' /
                           'train_seconds.json'))
  again = {r['model']: r for r in scaling.run(args())}
  assert again['ar'] == ar
  assert again['tokcom']['train_seconds'] == tokcom['train_seconds']
  assert json.load(open(tmp_path / 'runs' / 'tokcom_2' / 'diffusion' /
                        'train_seconds.json')) == seconds
  assert again['tokcom']['perplexity'] == pytest.approx(tokcom['perplexity'])
  assert len(open(out).read().splitlines()) == 2
