"""Load test of the HTTP server: `python -m tokcom_jax.serve` started on 127.0.0.1
with batching (`--max_batch 32`) and without (`--max_batch 1`), then 1, 8 and 32
concurrent clients, each sending streamed completions (each its own seed) until the
round's requests are done; p50 / p99 latency, time to the first chunk, tokens/s
(completion tokens the server reports) and errors per round.

    python benchmarks/serve_load.py --workdir runs/tiny/diffusion --requests 256

One JSON line per (batching, clients). Before the rounds, one unrecorded round at the
largest concurrency compiles the batch sizes it meets.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

import common
import httpx
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def one(base: str, body: dict) -> tuple[float, float, int]:
  """(seconds to the first chunk, seconds to the end, completion tokens)."""
  start, first, tokens = time.perf_counter(), None, 0
  with httpx.stream('POST', base + '/v1/completions',
                    json={**body, 'stream': True, 'stream_options': {
                        'include_usage': True}}, timeout=600) as response:
    response.raise_for_status()
    for line in response.iter_lines():
      if not line.startswith('data: ') or line == 'data: [DONE]':
        continue
      event = json.loads(line[6:])
      if event.get('usage'):
        tokens = event['usage']['completion_tokens']
      if event['choices']:
        first = first or time.perf_counter()
  end = time.perf_counter()
  return (first or end) - start, end - start, tokens  # an empty completion: no chunk


def round_of(base: str, clients: int, requests: int, body: dict) -> dict:
  results, errors, lock = [], [], threading.Lock()
  todo = iter(range(requests))

  def client():
    for i in todo:
      try:
        r = one(base, {**body, 'seed': i})
        with lock:
          results.append(r)
      except Exception as e:  # noqa: BLE001 - counted, the round goes on
        with lock:
          errors.append(repr(e))

  start = time.perf_counter()
  threads = [threading.Thread(target=client) for _ in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - start
  first, latency = (np.array([r[i] for r in results]) for i in (0, 1))
  return {'bench': 'serve_load', 'clients': clients, 'requests': requests,
          'errors': len(errors), 'p50_latency_s': float(np.percentile(latency, 50)),
          'p99_latency_s': float(np.percentile(latency, 99)),
          'p50_first_chunk_s': float(np.percentile(first, 50)),
          'tokens_per_sec': sum(r[2] for r in results) / wall, 'wall_s': wall,
          'device': common.device_name()}


def serve(workdir: str, max_batch: int, max_tokens: int):
  """(server process, base URL) once it answers."""
  port = free_port()
  server = subprocess.Popen(
      [sys.executable, '-m', 'tokcom_jax.serve', f'--workdir={workdir}',
       f'--port={port}', f'--max_batch={max_batch}', f'--warm_tokens={max_tokens}'],
      cwd=REPO, stdout=subprocess.PIPE,
      text=True)
  print(server.stdout.readline().strip(), file=sys.stderr)  # compiled in … s
  base = f'http://127.0.0.1:{port}'
  while True:  # the port opens just after the line
    try:
      httpx.get(base + '/health', timeout=5)
      return server, base
    except httpx.TransportError:
      assert server.poll() is None, 'the server exited'
      time.sleep(0.1)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--workdir', default='runs/tiny/diffusion')
  p.add_argument('--clients', default='1,8,32')
  p.add_argument('--requests', type=int, default=256, help='per round')
  p.add_argument('--max_tokens', type=int, default=64)
  p.add_argument('--prompt', default='', help='(whole chunks: batched)')
  p.add_argument('--max_batch', default='32,1', help='server settings to compare')
  args = p.parse_args()
  body = {'prompt': args.prompt, 'max_tokens': args.max_tokens}
  clients = [int(c) for c in args.clients.split(',')]
  for max_batch in map(int, args.max_batch.split(',')):
    server, base = serve(args.workdir, max_batch, args.max_tokens)
    try:
      round_of(base, max(clients), args.requests, body)  # compiles, not recorded
      for c in clients:
        common.emit({**round_of(base, c, args.requests, body), 'max_batch': max_batch})
    finally:
      server.terminate()
      server.wait(timeout=60)


if __name__ == '__main__':
  main()
