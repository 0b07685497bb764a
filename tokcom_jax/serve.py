"""Serve a trained run over HTTP: OpenAI-style completions (whole, or streamed one
chunk at a time as server-sent events), the VAE's reconstruct / encode / decode, the
model card with its limits, a health check, and a playground page at `/`.

    python -m tokcom_jax.serve --workdir runs/tiny/diffusion [--host 127.0.0.1] [--port 8000]

    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "import os\\n", "max_tokens": 32, "seed": 0}'

A TokCom run and an `ar` run serve the same API (`Backend`). The run is loaded once
and its default sampler compiled before the port opens. Every bounded input (prompt
length, `max_tokens`, `n`, `steps`, the body's size) has a limit (flags, shown by
`/v1/models`); anything outside them, a wrong type, an unknown field or malformed
JSON gets a 4xx JSON error naming the field. Concurrent completions of a TokCom
chunk generator at temperature 0 with whole-chunk prompts are merged into one batch
(`--max_batch` rows, waiting `--batch_wait_ms` for more; `inference/batching.py`),
each the text it gets alone; other requests run one at a time (one model, one
device). The host is 127.0.0.1 unless `--host` says otherwise; SIGTERM lets the
requests in flight finish, then exits 0 (uvicorn's graceful shutdown).
"""

# No `from __future__ import annotations`: FastAPI reads the request models from
# the handlers' annotations, which must be the classes, not their names.
import contextlib
import dataclasses
import json
import pathlib
import signal
import sys
import threading
import time
from typing import Any, Iterator

import numpy as np

from tokcom_jax.errors import SamplingError
from tokcom_jax.inference.completions import Backend, Limits, RequestError, check

# The page at `/`: a prompt, the sampling settings, the completion streamed in.
PLAYGROUND = pathlib.Path(__file__).with_name('playground.html')


# ------------------------------------------------------------------ the HTTP app

def _schemas():
  from pydantic import BaseModel, ConfigDict

  class StreamOptions(BaseModel):
    model_config = ConfigDict(extra='forbid', strict=True)
    include_usage: bool = False  # a last event with the usage, as OpenAI's

  class Completion(BaseModel):
    model_config = ConfigDict(extra='forbid', strict=True)
    prompt: str = ''
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    steps: int | None = None
    noise_scale: float | None = None
    model: str | None = None  # accepted as OpenAI clients send it; one model here

  class Text(BaseModel):
    model_config = ConfigDict(extra='forbid', strict=True)
    text: str

  class Latents(BaseModel):
    model_config = ConfigDict(extra='forbid')
    latents: list[list[float]]

  return Completion, Text, Latents


def create_app(backend: Backend):
  """The FastAPI app over one Backend."""
  from fastapi import FastAPI, Request
  from fastapi.exceptions import RequestValidationError
  from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
  Completion, Text, Latents = _schemas()
  app = FastAPI(title='tokcom_jax', docs_url=None, redoc_url=None)

  def error(status: int, message: str, param: str | None) -> JSONResponse:
    return JSONResponse({'error': {'message': message, 'type': 'invalid_request_error',
                                   'param': param}}, status_code=status)

  @app.exception_handler(RequestValidationError)
  async def invalid(request, exc):
    first = exc.errors()[0]
    loc = [str(p) for p in first.get('loc', ()) if p != 'body']
    param = loc[0] if loc else None
    if first.get('type') == 'json_invalid':
      return error(400, 'the body is not valid JSON.', None)
    return error(400 if first.get('type') != 'missing' else 422,
                 f'{".".join(loc) or "body"}: {first.get("msg")}.', param)

  @app.exception_handler(RequestError)
  async def refused(request, exc):
    return error(exc.status, str(exc), exc.param)

  @app.exception_handler(SamplingError)
  async def sampling(request, exc):
    return error(400, str(exc), None)

  @app.middleware('http')
  async def body_size(request: Request, call_next):
    size = request.headers.get('content-length')
    if size and size.isdigit() and int(size) > backend.limits.max_body_bytes:
      return error(413, f'the body is {size} bytes; the limit is'
                   f' {backend.limits.max_body_bytes}.', None)
    return await call_next(request)

  def run(fn, *args):
    with backend.lock:
      return fn(*args)

  @app.get('/', response_class=HTMLResponse)
  def playground():
    return PLAYGROUND.read_text(encoding='utf-8')

  in_flight = [0]  # completions being answered
  count = threading.Lock()

  @app.get('/health')
  def health():
    return {'status': 'ok', 'completions_in_flight': in_flight[0]}

  @app.get('/v1/models')
  def models():
    return {'object': 'list', 'data': [backend.card()]}

  @app.post('/v1/completions')
  def completions(body: Completion):
    req = check(body.model_dump(), backend)
    with count:
      in_flight[0] += 1
    try:
      result = backend.complete(req)  # batched with others where it can be
    finally:
      with count:
        in_flight[0] -= 1
    created, rid = int(time.time()), f'cmpl-{time.time_ns():x}'
    head = {'id': rid, 'object': 'text_completion', 'created': created,
            'model': backend.workdir}
    usage = {**result['usage'], 'total_tokens': sum(result['usage'].values())}
    if not req['stream']:
      return {**head, 'usage': usage, 'choices': [
              {'index': i, 'text': text, 'finish_reason': reason, 'logprobs': None}
              for i, (text, reason, _) in enumerate(result['choices'])]}

    def events() -> Iterator[str]:
      for i, (_, reason, pieces) in enumerate(result['choices']):
        for j, piece in enumerate(pieces):
          last = j == len(pieces) - 1
          yield 'data: ' + json.dumps({**head, 'choices': [
              {'index': i, 'text': piece, 'logprobs': None,
               'finish_reason': reason if last else None}]}) + '\n\n'
      if (req['stream_options'] or {}).get('include_usage'):
        yield 'data: ' + json.dumps({**head, 'choices': [], 'usage': usage}) + '\n\n'
      yield 'data: [DONE]\n\n'
    return StreamingResponse(events(), media_type='text/event-stream')

  @app.post('/v1/reconstruct')
  def reconstruct(body: Text):
    return {'text': run(backend.vae().reconstruct, body.text)}

  @app.post('/v1/encode')
  def encode(body: Text):
    z = run(backend.vae().encode, body.text)
    return {'latents': np.asarray(z, np.float64).tolist(), 'shape': list(z.shape)}

  @app.post('/v1/decode')
  def decode(body: Latents):
    vae = backend.vae()
    z = np.asarray(body.latents, np.float32) if body.latents and all(
        len(r) == len(body.latents[0]) for r in body.latents) else None
    if z is None or z.ndim != 2 or z.shape[1] != vae.latent_dim:
      raise RequestError('latents', 'latents must be a non-empty list of rows of'
                         f' {vae.latent_dim} numbers.')
    return {'text': run(vae.decode, z)}

  return app


def warm_up(backend: Backend, max_tokens=(16,)) -> float:
  """Compiles the default completion (the request's defaults) for each of
  `max_tokens`, and with batching every batch size it can take (powers of 2 up to
  `max_batch`), so that no request waits for a compilation; its seconds."""
  start = time.perf_counter()
  if backend.is_ar or backend.model.dit_params is not None:
    for T in sorted({min(t, backend.context) for t in max_tokens}):
      req = check({'prompt': '', 'max_tokens': T, 'n': 1, 'seed': 0,
                   'temperature': 0.0, 'top_k': 0, 'top_p': 1.0, 'steps': None,
                   'noise_scale': None, 'stream': False, 'stream_options': None},
                  backend)
      backend.complete(req)
      rows = 2
      while backend.batcher and rows <= backend.limits.max_batch:  # as batches run
        backend._complete_batch((-(-T // backend.chunk_size), None, None, False),
                                [{**req, 'n': rows}])
        rows *= 2
  return time.perf_counter() - start


def main(argv) -> Any:
  del argv
  import uvicorn
  from absl import flags
  import tokcom_jax
  F = flags.FLAGS
  limits = Limits(**{f.name: getattr(F, f.name) for f in dataclasses.fields(Limits)})
  backend = Backend(tokcom_jax.load(F.workdir), F.workdir, limits)
  # The event loop, the request threads and the batcher hand the GIL to each other
  # at every request: at Python's default 5 ms a hand-off can cost more than a
  # sample (about 4 ms for 64 tokens of the tiny default).
  sys.setswitchinterval(0.0005)
  seconds = warm_up(backend, [int(t) for t in F.warm_tokens.split(',') if t])
  print(f'{F.workdir}: compiled in {seconds:.1f} s; serving on'
        f' http://{F.host}:{F.port}', flush=True)
  _Server(uvicorn.Config(create_app(backend), host=F.host, port=F.port,
                         log_level='warning')).run()


def _server_class():
  import uvicorn

  class Server(uvicorn.Server):
    """uvicorn's server, but SIGTERM / Ctrl-C end it with exit code 0 once the
    requests in flight are answered (uvicorn re-raises the signal after)."""

    @contextlib.contextmanager
    def capture_signals(self):
      stop = lambda signum, frame: setattr(self, 'should_exit', True)
      previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
      try:
        yield
      finally:
        for s, handler in previous.items():
          signal.signal(s, handler)
  return Server


_Server = lambda config: _server_class()(config)


def _define_flags():
  from absl import flags
  flags.DEFINE_string('workdir', None, 'The run to serve (a diffusion, VAE or ar run).')
  flags.DEFINE_string('host', '127.0.0.1', 'The address to listen on.')
  flags.DEFINE_integer('port', 8000, 'The port to listen on.')
  flags.DEFINE_string('warm_tokens', '16', 'max_tokens values whose completions are'
                      ' compiled before the port opens (comma-separated).')
  for field in dataclasses.fields(Limits):  # --max_tokens, --max_n, …
    flags.DEFINE_integer(field.name, field.default, 'A request limit (/v1/models).')
  flags.mark_flag_as_required('workdir')


if __name__ == '__main__':
  from tokcom_jax import cli
  _define_flags()
  cli.run(main)
