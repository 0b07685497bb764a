"""benchmarks/scaling.py --quick end to end: both models trained at equal FLOPs,
each point measured and written, the plot, the table, and a stopped sweep resumed."""

import json
import os
import sys

import pytest

from tests import background as background_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quick_sweep(scratch, corpus):
  """The sweep at one toy budget; then, its TokCom point struck from the results
  file (a sweep stopped after the AR point), the same command again. (first run,
  its rows, the TokCom point's recorded train seconds, second run, its rows, the
  scratch directory)."""
  source, cache = corpus
  root = scratch / 'runs'
  argv = [sys.executable, 'benchmarks/scaling.py', '--quick', '--budgets=2',
          f'--root={root}', f'--plot={scratch / "scaling.png"}',
          f'--set=data.source={source},data.cache_dir={cache}']
  read = lambda: [json.loads(l) for l in open(root / 'scaling.jsonl')]
  first = background_lib.run(argv, cwd=REPO)
  if first.returncode:
    return first, None, None, None, None, scratch
  rows = read()
  with open(root / 'scaling.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows if r['model'] == 'ar')
  seconds = json.load(open(root / 'tokcom_2' / 'diffusion' / 'train_seconds.json'))
  return first, rows, seconds, background_lib.run(argv, cwd=REPO), read(), scratch


@pytest.mark.slow
@pytest.mark.background(job=quick_sweep)
def test_quick_sweep_writes_every_point_and_resumes(background):
  first, rows, seconds, second, again_rows, scratch = background(quick_sweep)
  assert first.returncode == 0, first.stderr[-3000:]
  root = str(scratch / 'runs')
  by_model = {r['model']: r for r in rows}
  assert sorted(by_model) == ['ar', 'tokcom'] and {r['budget'] for r in rows} == {2}
  ar, tokcom = by_model['ar'], by_model['tokcom']
  # Equal compute: the AR stage's steps spend what the two stages spend, to within
  # one of its steps.
  assert abs(ar['train_flops'] - tokcom['train_flops']) <= ar['train_flops'] / ar['steps']
  assert ar['steps'] > 2 and tokcom['steps'] == 2
  for r in rows:
    assert r['reference'] == os.path.join(root, 'ar_2')
    assert r['perplexity'] > 1 and 0 <= r['chunk_validity'] <= 1
    assert 'brier_lm' in r['brier'] and r['tokens_per_sec_batch1'] > 0
    assert r['real']['perplexity'] > 1 and r['shuffled']['perplexity'] > 1
  assert open(scratch / 'scaling.png', 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
  assert first.stdout.count('\n| 2 |') == 2 and 'TokCom / AR perplexity' in first.stdout

  # Stopped after the AR point: the TokCom point is measured again, not retrained.
  assert second.returncode == 0, second.stderr[-3000:]
  again = {r['model']: r for r in again_rows}
  assert len(again_rows) == 2 and again['ar'] == ar
  assert again['tokcom']['train_seconds'] == tokcom['train_seconds']
  assert json.load(open(os.path.join(root, 'tokcom_2', 'diffusion',
                                     'train_seconds.json'))) == seconds
  assert again['tokcom']['perplexity'] == pytest.approx(tokcom['perplexity'])
