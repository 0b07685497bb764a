"""Completions over a loaded run, whatever its kind, for the HTTP server
(`tokcom_jax.serve`): the request's limits and checks, and one `Backend` that
completes a prompt with a TokCom run or an `ar` run alike and gives each completion
whole and chunk by chunk."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from tokcom_jax.data.tokenizer import ids_text, text_ids
from tokcom_jax.errors import TokcomError
from tokcom_jax.inference import batching


@dataclasses.dataclass(frozen=True)
class Limits:
  max_prompt_tokens: int = 1024
  max_tokens: int = 1024
  max_n: int = 16
  max_steps: int = 1000
  max_body_bytes: int = 1 << 20
  max_batch: int = 32  # rows that concurrent requests share in one call (1: none)
  batch_wait_ms: int = 2  # how long a batch waits for more requests


class RequestError(TokcomError):
  """A request the server refuses: 400 (or `status`), naming the field."""

  def __init__(self, param: str | None, message: str, status: int = 400):
    super().__init__(message)
    self.param, self.status = param, status


class Backend:
  """One loaded run behind the API: completions for TokCom and `ar` runs alike,
  the VAE's own calls where the run has one."""

  def __init__(self, model, workdir: str, limits: Limits):
    from tokcom_jax.inference.autoregressive import AutoregressiveLM
    self.model, self.workdir, self.limits = model, workdir, limits
    self.is_ar = isinstance(model, AutoregressiveLM)
    self.chunk_size = model.config.chunk_size
    self.context = model.config.max_length - (1 if self.is_ar else 0)
    self.lock = threading.Lock()  # one request on the device at a time
    # Batched, a TokCom chunk generator's sample is the one it draws alone (its noise
    # keyed by (seed, index)); argmax decoding only, whole-chunk prompts only.
    c = model.config
    batchable = (not self.is_ar and model.dit_params is not None
                 and c.flow.order == 'head' and c.head.kind == 'flow'
                 and limits.max_batch > 1)
    self.batcher = batching.Batcher(
        self._complete_batch, self.lock, limits.max_batch,
        limits.batch_wait_ms / 1e3) if batchable else None

  def card(self) -> dict:
    kind = 'ar' if self.is_ar else ('tokcom' if self.model.dit_params is not None
                                     else 'vae')
    return {'id': self.workdir, 'object': 'model', 'owned_by': 'tokcom_jax',
            'kind': kind, 'chunk_size': self.chunk_size, 'context_tokens': self.context,
            'limits': dataclasses.asdict(self.limits)}

  def complete(self, req: dict) -> dict:
    """{'choices': [(text, finish_reason, [chunk texts])], 'usage': …}: in a batch
    with concurrent requests where it can be, else alone."""
    if self.model.__class__.__name__ == 'TokCom' and self.model.dit_params is None:
      raise RequestError(None, f'{self.workdir} is a stage-1 (VAE) run: it can'
                         ' reconstruct, encode and decode, not complete.')
    ids, T = self._check_lengths(req)
    P, K = len(ids), self.chunk_size
    if self.batcher and req['temperature'] == 0 and P % K == 0:
      key = (-(-(P + T) // K), req['steps'], req['noise_scale'], P > 0)
      tokens = self.batcher.submit(key, req['n'], req)
    else:
      with self.lock:
        tokens = self._sample(req, ids, T)
    return self._result(tokens, ids, T)

  def _check_lengths(self, req: dict) -> tuple[np.ndarray, int]:
    """(prompt ids, max_tokens), refused where they do not fit."""
    prompt = req['prompt']
    ids = text_ids(self.model.tokenizer, prompt) if prompt else np.zeros(0, np.int32)
    P, T = len(ids), req['max_tokens']
    if P > self.limits.max_prompt_tokens:
      raise RequestError('prompt', f'prompt is {P} tokens; the limit is'
                         f' {self.limits.max_prompt_tokens}.')
    room = self.context - (-(-P // self.chunk_size) * self.chunk_size if not self.is_ar
                           else P)
    if T > room:
      raise RequestError('max_tokens', f'max_tokens {T} does not fit: the context'
                         f' holds {room} tokens after this prompt.')
    return ids, T

  def _sample(self, req: dict, ids: np.ndarray, T: int) -> np.ndarray:
    sampling = dict(seed=req['seed'], batch_size=req['n'],
                    temperature=req['temperature'], top_k=req['top_k'],
                    top_p=req['top_p'], prompt=req['prompt'] or None)
    if self.is_ar:
      return self.model.sample(req['n'], num_tokens=T, **sampling)
    return self.model.sample(req['n'], num_chunks=-(-(len(ids) + T) // self.chunk_size),
                             steps=req['steps'], noise_scale=req['noise_scale'],
                             **sampling)[1]

  def _complete_batch(self, key, reqs: list[dict]) -> list[np.ndarray]:
    """Token ids of requests that share `key` (chunks, steps, noise scale), drawn
    in one batch: each what `_sample` gives it alone (a request of n rows alone is
    a batch of n: to the last bit when n is a power of 2)."""
    num_chunks, steps, noise_scale, _ = key
    rows = sum(r['n'] for r in reqs)  # padded to a power of 2: few programs compiled
    return self.model.sample_batch([(r['n'], r['seed'], r['prompt'] or None)
                                    for r in reqs], num_chunks, steps, noise_scale,
                                   pad_to=1 << (rows - 1).bit_length())

  def _result(self, tokens, ids: np.ndarray, T: int) -> dict:
    tok, P = self.model.tokenizer, len(ids)
    choices, generated = [], 0
    for row in np.asarray(tokens)[:, P:P + T]:  # a document's end (EOS) stops it
      stop = np.flatnonzero(row == tok.eos_token_id)
      row = row[:stop[0]] if len(stop) else row
      generated += len(row)
      choices.append((ids_text(tok, row), 'stop' if len(stop) else 'length',
                      self._pieces(row, P)))
    return {'choices': choices,
            'usage': {'prompt_tokens': int(P), 'completion_tokens': int(generated)}}

  def _pieces(self, row: np.ndarray, P: int) -> list[str]:
    """The completion's text chunk by chunk (the first ends where the prompt's last
    chunk does): each piece is the text added by its tokens, so they join to the
    whole."""
    K, tok = self.chunk_size, self.model.tokenizer
    ends = list(range(K - P % K if P % K else K, len(row), K)) + [len(row)]
    pieces, before = [], ''
    for end in ends:
      text = ids_text(tok, row[:end])
      pieces.append(text[len(before):] if text.startswith(before) else text)
      before = text
    return [p for p in pieces if p]

  def vae(self):
    if self.is_ar:
      raise RequestError(None, f'{self.workdir} is an ar run: it has no VAE to'
                         ' reconstruct, encode or decode with.', 404)
    return self.model


def check(req: dict, backend: Backend) -> dict:
  lim = backend.limits
  bounds = {'max_tokens': (1, lim.max_tokens), 'n': (1, lim.max_n),
            'top_k': (0, None), 'seed': (0, 2**32 - 1)}
  if req['steps'] is not None:
    bounds['steps'] = (1, lim.max_steps)
  for field, (low, high) in bounds.items():
    v = req[field]
    if v < low or (high is not None and v > high):
      raise RequestError(field, f'{field} must be between {low} and'
                         f' {high if high is not None else "any"}; got {v}.')
  if not 0 < req['top_p'] <= 1:
    raise RequestError('top_p', f'top_p must be in (0, 1]; got {req["top_p"]}.')
  if not 0 <= req['temperature'] <= 100:
    raise RequestError('temperature', 'temperature must be in [0, 100]; got'
                       f' {req["temperature"]}.')
  if req['noise_scale'] is not None and not 0 < req['noise_scale'] <= 10:
    raise RequestError('noise_scale', 'noise_scale must be in (0, 10]; got'
                       f' {req["noise_scale"]}.')
  if backend.is_ar:
    for field in ('steps', 'noise_scale'):
      if req[field] is not None:
        raise RequestError(field, f'{field} is for TokCom runs; {backend.workdir} is'
                           ' an ar run.')
  return req
