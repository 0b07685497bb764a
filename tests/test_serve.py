"""The HTTP server on the suite's micro runs, over real HTTP: every endpoint, the
streamed chunks against the whole answer, and every bounded field refused with a
4xx naming it."""

import concurrent.futures
import contextlib
import dataclasses
import html.parser
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import warnings

import numpy as np
import pytest

pytest.importorskip('fastapi')
import httpx  # noqa: E402
import uvicorn  # noqa: E402

import tokcom_jax  # noqa: E402
from tokcom_jax import serve  # noqa: E402

pytestmark = pytest.mark.slow
LIMITS = serve.Limits(max_prompt_tokens=12, max_tokens=24, max_n=3, max_steps=20,
                      max_body_bytes=4096)


@contextlib.contextmanager
def serving(workdir, limits=LIMITS):
  """The app of one run on 127.0.0.1 at a free port, in a thread; its base URL."""
  backend = serve.Backend(tokcom_jax.load(workdir), workdir, limits)
  server = uvicorn.Server(uvicorn.Config(serve.create_app(backend), host='127.0.0.1',
                                         port=0, log_level='warning'))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  while not server.started:
    assert thread.is_alive()
    time.sleep(0.01)
  port = server.servers[0].sockets[0].getsockname()[1]
  try:
    yield f'http://127.0.0.1:{port}', backend
  finally:
    server.should_exit = True
    thread.join()


@pytest.fixture(scope='module')
def tokcom(runs):
  with serving(runs[1]) as served:
    yield served


def post(base, path, body, **kwargs):
  return httpx.post(base + path, json=body, timeout=120, **kwargs)


def test_health_and_the_model_card_with_its_limits(tokcom):
  base, backend = tokcom
  assert httpx.get(base + '/health').json() == {'status': 'ok', 'completions_in_flight': 0}
  card = httpx.get(base + '/v1/models').json()['data'][0]
  assert card['kind'] == 'tokcom' and card['chunk_size'] == 4
  assert card['limits']['max_tokens'] == 24 and card['limits']['max_n'] == 3


def test_a_completion_is_the_sampler_s_text_and_streams_in_chunks(tokcom):
  base, backend = tokcom
  body = {'prompt': 'import os\n', 'max_tokens': 10, 'n': 2, 'seed': 3, 'steps': 4}
  out = post(base, '/v1/completions', body).json()
  assert out.get('object') == 'text_completion' and len(out['choices']) == 2, out
  # The same call through the Python API: the tokens after the prompt.
  model = backend.model
  P = len(model._tokens('import os\n'))
  _, tokens = model.sample(2, num_chunks=-(-(P + 10) // 4), steps=4, seed=3,
                           prompt='import os\n', batch_size=2)
  for choice, row in zip(out['choices'], tokens[:, P:P + 10]):
    eos = np.flatnonzero(row == model.tokenizer.eos_token_id)
    row = row[:eos[0]] if len(eos) else row
    assert choice['text'] == model.text(row)
    assert choice['finish_reason'] == ('stop' if len(eos) else 'length')
  assert out['usage']['prompt_tokens'] == P
  assert 0 < out['usage']['completion_tokens'] <= 20
  # Streamed: one event per chunk, joined they are the whole text, then [DONE].
  with httpx.stream('POST', base + '/v1/completions', json={**body, 'stream': True},
                    timeout=120) as response:
    assert response.headers['content-type'].startswith('text/event-stream')
    lines = [l[len('data: '):] for l in response.iter_lines() if l]
  assert lines[-1] == '[DONE]'
  events = [json.loads(l) for l in lines[:-1]]
  for i, choice in enumerate(out['choices']):
    pieces = [e['choices'][0]['text'] for e in events if e['choices'][0]['index'] == i]
    assert ''.join(pieces) == choice['text'] and len(pieces) >= 2
  assert len(events) >= 4
  # With stream_options.include_usage, a last event carries the usage (OpenAI's).
  with httpx.stream('POST', base + '/v1/completions', timeout=120, json={
      **body, 'stream': True, 'stream_options': {'include_usage': True}}) as response:
    lines = [l for l in response.iter_lines() if l]
  assert lines[-1] == 'data: [DONE]'
  last = json.loads(lines[-2][len('data: '):])
  assert last['choices'] == [] and last['usage'] == out['usage']


def test_reconstruct_encode_and_decode(tokcom):
  base, backend = tokcom
  text = 'import os\nimport sys\n'
  z = post(base, '/v1/encode', {'text': text}).json()
  assert z['shape'] == [len(z['latents']), 16] and len(z['latents'][0]) == 16
  decoded = post(base, '/v1/decode', {'latents': z['latents']}).json()['text']
  assert decoded == backend.model.decode(np.asarray(z['latents'], np.float32))
  assert post(base, '/v1/reconstruct', {'text': text}).json()['text'] == (
      backend.model.reconstruct(text))


@pytest.mark.parametrize('body, status, param', [
    ({'max_tokens': 25}, 400, 'max_tokens'),
    ({'max_tokens': 0}, 400, 'max_tokens'),
    ({'n': 4}, 400, 'n'),
    ({'steps': 21}, 400, 'steps'),
    ({'prompt': 'x ' * 40}, 400, 'prompt'),
    ({'top_p': 0}, 400, 'top_p'),
    ({'seed': -1}, 400, 'seed'),
    ({'max_tokens': '5'}, 400, 'max_tokens'),  # a string, not a number
    ({'colour': 'red'}, 400, 'colour'),  # unknown
    ({'n': 0}, 400, 'n'),
    ({'steps': 0}, 400, 'steps'),
    ({'seed': 2**32}, 400, 'seed'),
    ({'top_k': -1}, 400, 'top_k'),
    ({'top_p': 1.5}, 400, 'top_p'),
    ({'temperature': -0.5}, 400, 'temperature'),
    ({'temperature': 101}, 400, 'temperature'),
    ({'noise_scale': 0}, 400, 'noise_scale'),
    ({'noise_scale': 11}, 400, 'noise_scale'),
    ({'max_tokens': 1.5}, 400, 'max_tokens'),  # a float where an integer goes
    ({'prompt': 5}, 400, 'prompt'),
    ({'stream': 'yes'}, 400, 'stream'),
    ({'stream_options': {'usage': True}}, 400, 'stream_options'),  # unknown inside
])
def test_every_bounded_or_wrong_field_is_refused_by_name(tokcom, body, status, param):
  base, _ = tokcom
  response = post(base, '/v1/completions', {'prompt': 'x', **body})
  assert response.status_code == status
  error = response.json()['error']
  assert error['param'] == param and param in error['message']


def test_malformed_too_large_and_misshapen_bodies_are_4xx(tokcom):
  base, _ = tokcom
  bad = httpx.post(base + '/v1/completions', content=b'{"prompt": ',
                   headers={'content-type': 'application/json'})
  assert bad.status_code == 400 and 'not valid JSON' in bad.json()['error']['message']
  big = post(base, '/v1/encode', {'text': 'x' * 5000})
  assert big.status_code == 413 and '4096' in big.json()['error']['message']
  shape = post(base, '/v1/decode', {'latents': [[0.0] * 3]})
  assert shape.status_code == 400 and shape.json()['error']['param'] == 'latents'


def test_an_ar_run_serves_the_same_completions(ar_run):
  with serving(ar_run) as (base, backend):
    out = post(base, '/v1/completions', {'prompt': 'import os\n', 'max_tokens': 6,
                                          'seed': 1, 'temperature': 1.0}).json()
    assert len(out['choices']) == 1 and out['usage']['prompt_tokens'] > 0
    expected = backend.model.generate(1, num_tokens=6, seed=1, prompt='import os\n',
                                      batch_size=1)[0][len('import os\n'):]
    assert out['choices'][0]['text'] == expected or out['choices'][0][
        'finish_reason'] == 'stop'
    refused = post(base, '/v1/completions', {'prompt': 'x', 'steps': 4})
    assert refused.status_code == 400 and refused.json()['error']['param'] == 'steps'
    assert post(base, '/v1/encode', {'text': 'x'}).status_code == 404


BURST = [(1, 0), (2, 1), (1, 2), (3, 3), (1, 4)]  # (n, seed) of requests: 8 rows


@pytest.fixture(scope='module')
def generator(head_run_dir):
  """The chunk generator's run, batching up to 8 rows: a batch closes when it is
  full, however long its requests take to arrive (a minute at most)."""
  limits = dataclasses.replace(LIMITS, max_batch=8, batch_wait_ms=60_000)
  with serving(head_run_dir, limits) as served:
    yield served


def test_a_burst_of_requests_is_one_batch_and_each_gets_its_own_answer(generator):
  base, backend = generator
  assert backend.card()['limits']['max_batch'] == 8
  bodies = [{'max_tokens': 12, 'n': n, 'seed': seed} for n, seed in BURST]
  before = list(backend.batcher.batches)
  with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
    answers = list(pool.map(lambda b: post(base, '/v1/completions', b).json(), bodies))
  assert list(backend.batcher.batches)[len(before):] == [8]  # the 5 requests, one call
  model = backend.model
  for (n, seed), answer in zip(BURST, answers):
    _, alone = model.sample(n, num_chunks=3, seed=seed)  # what sample.py gives
    texts = []
    for row in alone[:, :12]:  # a document's end stops a completion
      stop = np.flatnonzero(row == model.tokenizer.eos_token_id)
      texts.append(model.text(row[:stop[0]] if len(stop) else row))
    assert [c['text'] for c in answer['choices']] == texts, (n, seed)
  # Different rows drew different samples (the seeds and indices reached the noise).
  assert len({c['text'] for a in answers for c in a['choices']}) > 4


def test_the_batcher_keeps_keys_apart_and_hands_errors_to_their_batch():
  import threading

  from tokcom_jax.inference import batching
  calls = []

  def run(key, items):
    calls.append((key, list(items)))
    if key == 'bad':
      raise ValueError('no')
    return [f'{key}:{item}' for item in items]
  batcher = batching.Batcher(run, threading.Lock(), max_rows=3, max_wait_s=60)
  with concurrent.futures.ThreadPoolExecutor(6) as pool:
    futures = [pool.submit(batcher.submit, key, 1, item)
               for key, item in [('a', 1), ('b', 2), ('a', 3), ('b', 4), ('a', 5),
                                 ('b', 6)]]
    results = [f.result() for f in futures]
  assert results == ['a:1', 'b:2', 'a:3', 'b:4', 'a:5', 'b:6']
  assert sorted((k, sorted(i)) for k, i in calls) == [('a', [1, 3, 5]), ('b', [2, 4, 6])]
  assert list(batcher.batches) == [3, 3]
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    bad = [pool.submit(batcher.submit, 'bad', 1, i) for i in range(3)]
    assert all(isinstance(f.exception(), ValueError) for f in bad)


class _Chunks(html.parser.HTMLParser):
  """The texts of the page's <span class="chunk"> elements, and <body>'s state."""

  def __init__(self):
    super().__init__()
    self.chunks, self.state, self._in_chunk = [], None, False

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == 'body':
      self.state = attrs.get('data-state')
    if tag == 'span' and attrs.get('class') == 'chunk':
      self._in_chunk = True
      self.chunks.append('')

  def handle_endtag(self, tag):
    self._in_chunk = self._in_chunk and tag != 'span'

  def handle_data(self, data):
    if self._in_chunk:
      self.chunks[-1] += data


def chromium(scratch, corpus):
  """Debian's chromium, or None. `.ci/run` installs it while the suite runs
  (`TOKCOM_CHROMIUM_INSTALL`: its log; `<log>.done` once it has ended): it is waited
  for, up to 10 minutes."""
  log = os.environ.get('TOKCOM_CHROMIUM_INSTALL')
  deadline = time.monotonic() + (600 if log else 0)
  while (shutil.which('chromium') is None and time.monotonic() < deadline
         and not os.path.exists(f'{log}.done')):
    time.sleep(2)
  return shutil.which('chromium')


@pytest.mark.background(job=chromium)
def test_the_playground_page_streams_a_completion_in_a_headless_browser(
    tokcom, tmp_path, background):
  """Debian's chromium opens `/` with the form filled and Generate pressed (the
  page's ?…&generate=1), runs its script to the end of the stream, and the page's
  chunks are the completion's."""
  base, _ = tokcom
  page = httpx.get(base + '/')
  assert page.status_code == 200 and '<button id="generate"' in page.text
  # Every setting on the page is a field of the completions request.
  fields = set(re.findall(r'<(?:input|textarea) id="(\w+)"', page.text))
  assert fields == {'prompt', 'max_tokens', 'seed', 'temperature', 'top_k', 'top_p',
                    'steps', 'noise_scale'}
  assert fields <= set(serve._schemas()[0].model_fields)
  browser = background(chromium)
  if browser is None:  # the rest needs a browser: .ci/run installs one
    log = os.environ.get('TOKCOM_CHROMIUM_INSTALL')
    warnings.warn('no chromium here (apt-get install chromium): the page was not run'
                  + (f'; the install said: {open(log).read()[-500:]}'
                     if log and os.path.exists(log) else ''))
    return
  query = urllib.parse.urlencode({'prompt': 'import os\n', 'max_tokens': 12, 'seed': 3,
                                  'steps': 4, 'generate': 1})
  out = subprocess.run(
      [browser, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
       '--no-first-run', '--disable-background-networking', '--disable-component-update',
       '--disable-sync', f'--user-data-dir={tmp_path}', '--virtual-time-budget=60000',
       '--dump-dom', f'{base}/?{query}'], capture_output=True, text=True, timeout=120)
  dom = _Chunks()
  dom.feed(out.stdout)
  assert dom.state == 'done', out.stdout[-3000:] + out.stderr[-2000:]
  want = post(base, '/v1/completions', {'prompt': 'import os\n', 'max_tokens': 12,
                                         'seed': 3, 'steps': 4}).json()
  assert ''.join(dom.chunks) == want['choices'][0]['text']
  assert len(dom.chunks) >= 2  # streamed as chunks, each its own element


def test_the_readme_commands_work_and_sigterm_answers_the_request_in_flight(head_run_dir):
  """`python -m tokcom_jax.serve` on the micro chunk generator: the line it prints,
  the README's curl commands as written (on its port), then SIGTERM while a long
  completion is in flight: that completion is answered, and the server exits 0."""
  from tests import test_readme
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen([sys.executable, '-m', 'tokcom_jax.serve',
                           f'--workdir={head_run_dir}', f'--port={port}'],
                          cwd=test_readme.REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    first = proc.stdout.readline()
    assert re.fullmatch(rf'\S+: compiled in \d+\.\d s; serving on http://127\.0\.0\.1:{port}\n',
                        first), (first, proc.stderr.read()[-3000:] if proc.poll() else '')
    base = f'http://127.0.0.1:{port}'
    while True:  # the port opens just after the line
      try:
        assert httpx.get(base + '/health').json()['completions_in_flight'] == 0
        break
      except httpx.TransportError:
        time.sleep(0.05)
    (block,) = test_readme.marked_blocks('<!-- tested against a server -->', 'bash')
    for line in test_readme.commands(block):
      out = subprocess.run(['bash', '-c', line.replace('localhost:8000', f'localhost:{port}')],
                           capture_output=True, text=True, timeout=120)
      assert out.returncode == 0 and out.stdout, (line, out.stderr)
      if '"stream": true' in line:
        assert out.stdout.rstrip().endswith('data: [DONE]'), out.stdout
      else:
        assert 'error' not in json.loads(out.stdout), out.stdout
    # A long completion (alone: temperature > 0), SIGTERM once it is in flight.
    answer = {}
    request = threading.Thread(target=lambda: answer.update(response=httpx.post(
        base + '/v1/completions', timeout=300, json={
            'max_tokens': 28, 'n': 16, 'steps': 1000, 'temperature': 0.5})))
    request.start()
    while httpx.get(base + '/health').json()['completions_in_flight'] == 0:
      assert request.is_alive()
      time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    request.join()
    response = answer['response']
    assert response.status_code == 200 and len(response.json()['choices']) == 16
    assert proc.wait(timeout=120) == 0
  finally:
    proc.kill()
    proc.wait()
