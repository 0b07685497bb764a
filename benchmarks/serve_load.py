"""Load test of the HTTP server: `python -m tokcom_jax.serve` started on 127.0.0.1,
then 1, 8 and 32 concurrent clients, each sending streamed completions until the
round's requests are done; p50 / p99 latency, time to the first chunk, tokens/s and
errors per round.

    python benchmarks/serve_load.py --workdir runs/tiny/diffusion --requests 64

One JSON line per concurrency. Requests run one at a time on the server (one model,
one device): latency grows with clients while throughput stays that of one stream.
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
  start, first, text = time.perf_counter(), None, []
  with httpx.stream('POST', base + '/v1/completions', json={**body, 'stream': True},
                    timeout=600) as response:
    response.raise_for_status()
    for line in response.iter_lines():
      if not line.startswith('data: ') or line == 'data: [DONE]':
        continue
      first = first or time.perf_counter()
      text.append(json.loads(line[6:])['choices'][0]['text'])
  return first - start, time.perf_counter() - start, body['max_tokens']


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


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--workdir', default='runs/tiny/diffusion')
  p.add_argument('--clients', default='1,8,32')
  p.add_argument('--requests', type=int, default=64, help='per round')
  p.add_argument('--max_tokens', type=int, default=32)
  args = p.parse_args()
  port = free_port()
  server = subprocess.Popen(
      [sys.executable, '-m', 'tokcom_jax.serve', f'--workdir={args.workdir}',
       f'--port={port}'], cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    print(server.stdout.readline().strip(), file=sys.stderr)  # compiled in … s
    base = f'http://127.0.0.1:{port}'
    while True:  # the port opens just after the line
      try:
        httpx.get(base + '/health', timeout=5)
        break
      except httpx.TransportError:
        time.sleep(0.1)
    body = {'prompt': 'import os\n', 'max_tokens': args.max_tokens}
    one(base, {**body, 'seed': 0})  # warm
    for clients in map(int, args.clients.split(',')):
      common.emit(round_of(base, clients, args.requests, body))
  finally:
    server.terminate()
    server.wait(timeout=60)


if __name__ == '__main__':
  main()
