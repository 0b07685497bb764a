"""The HTTP server on the suite's micro runs, over real HTTP: every endpoint, the
streamed chunks against the whole answer, and every bounded field refused with a
4xx naming it."""

import contextlib
import json
import threading
import time

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
def serving(workdir):
  """The app of one run on 127.0.0.1 at a free port, in a thread; its base URL."""
  backend = serve.Backend(tokcom_jax.load(workdir), workdir, LIMITS)
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
  assert httpx.get(base + '/health').json() == {'status': 'ok'}
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
