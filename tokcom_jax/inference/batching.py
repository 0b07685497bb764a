"""Concurrent requests merged into one batch (the server's batching).

A `Batcher` owns one worker thread. `submit(key, rows, item)` queues an item and
blocks until its result is back; the worker takes the oldest queued item, waits up
to `max_wait_s` for more with the same key (requests that can share a compiled call:
same length, steps, …) until `max_rows` rows, and runs them in one call of
`run(key, items) -> results` under the device's lock. Items with another key wait
for a later batch, in order. While one batch runs, the requests that arrive queue
up and go together into the next: throughput grows with the number of clients, and
a request alone waits at most `max_wait_s` more.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import queue
import threading
import time
from typing import Any, Callable, Hashable


@dataclasses.dataclass
class _Pending:
  key: Hashable
  rows: int
  item: Any
  future: concurrent.futures.Future = dataclasses.field(
      default_factory=concurrent.futures.Future)


class Batcher:

  def __init__(self, run: Callable[[Hashable, list[Any]], list[Any]],
               lock: threading.Lock, max_rows: int, max_wait_s: float):
    self.run, self.lock = run, lock
    self.max_rows, self.max_wait_s = max_rows, max_wait_s
    self._queue: queue.Queue = queue.Queue()
    # Rows of the latest batches run (a long-running server keeps the last 1024).
    self.batches: collections.deque[int] = collections.deque(maxlen=1024)
    threading.Thread(target=self._loop, name='batcher', daemon=True).start()

  def submit(self, key: Hashable, rows: int, item: Any) -> Any:
    """`item`'s result, run in a batch with others of the same `key`; `run`'s
    exception is raised here, in every request of that batch."""
    pending = _Pending(key, rows, item)
    self._queue.put(pending)
    return pending.future.result()

  def _loop(self) -> None:
    waiting: collections.deque[_Pending] = collections.deque()
    while True:
      if not waiting:
        waiting.append(self._queue.get())
      first = waiting.popleft()
      batch, rows = [first], first.rows
      for p in list(waiting):  # the queued ones with its key, oldest first
        if p.key == first.key and rows + p.rows <= self.max_rows:
          waiting.remove(p)
          batch.append(p)
          rows += p.rows
      deadline = time.monotonic() + self.max_wait_s
      while rows < self.max_rows:
        try:
          p = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
          break
        if p.key == first.key and rows + p.rows <= self.max_rows:
          batch.append(p)
          rows += p.rows
        else:
          waiting.append(p)
      self._run(batch, rows)

  def _run(self, batch: list[_Pending], rows: int) -> None:
    try:
      with self.lock:
        results = self.run(batch[0].key, [p.item for p in batch])
    except BaseException as e:  # noqa: BLE001  (each request of the batch gets it)
      for p in batch:
        p.future.set_exception(e)
      return
    self.batches.append(rows)
    for p, result in zip(batch, results):
      p.future.set_result(result)
