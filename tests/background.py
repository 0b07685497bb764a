"""Subprocess work that starts with the session and runs beside the in-process tests.

On 2 cores the in-process tests keep about one core busy (they compile and run one
program at a time), while the end-to-end tests mostly wait on the processes they
start (train.py, the benchmarks' scripts). Those processes are started here, at the
beginning of the session, one job after another on a thread of their own, and the
tests that check them run last (`conftest.py` moves them) and wait for their job's
result: the two kinds of work share the two cores instead of taking turns.

A job is a function of (scratch directory, corpus) that starts processes with `run`
and returns what its test checks; it must not use JAX in this process. A test names
its job with `@pytest.mark.background(job=…)` and reads `result(job)`; run alone (its
job not started), `result` runs the job then and there. What a job returns does not
depend on when it runs: only the wall time does.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import threading
import traceback
from typing import Any, Callable

Job = Callable[[pathlib.Path, tuple[str, str]], Any]
TIMEOUT = 600  # seconds one process of a job may take

_results: dict[Job, threading.Event] = {}
_values: dict[Job, tuple[bool, Any]] = {}
_running: set[subprocess.Popen] = set()
_lock = threading.Lock()
_cancelled = threading.Event()


def run(argv, *, cwd, env=None, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
  """subprocess.run(argv, capture_output=True, text=True) in a session of its own,
  killed (with what it started) when the test session ends first."""
  return run_together([argv], cwd=cwd, env=env, timeout=timeout)[0]


def run_together(argvs, *, cwd, env=None, timeout: int = TIMEOUT
                 ) -> list[subprocess.CompletedProcess]:
  """`run` of several processes at once (e.g. the processes of one training run)."""
  if _cancelled.is_set():
    raise RuntimeError('the test session ended before this job ran')
  procs = [subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
           for argv in argvs]
  with _lock:
    _running.update(procs)
  outs = []
  try:
    for proc in procs:
      try:
        stdout, stderr = proc.communicate(timeout=timeout)
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stderr += f'\n[killed after {timeout} s]'
      outs.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout,
                                              stderr))
  finally:
    with _lock:
      _running.difference_update(procs)
  return outs


def _do(job: Job, scratch: pathlib.Path, corpus) -> None:
  try:
    _values[job] = (True, job(scratch, corpus))
  except BaseException:  # noqa: BLE001  (re-raised in the test that reads it)
    _values[job] = (False, traceback.format_exc())
  _results[job].set()


def start(jobs: list[Job], make_scratch: Callable[[str], pathlib.Path],
          corpus) -> None:
  """Runs `jobs` one after another on a thread, in their order."""
  jobs = [j for j in dict.fromkeys(jobs) if j not in _results]
  for job in jobs:
    _results[job] = threading.Event()
  scratch = {job: make_scratch(job.__name__) for job in jobs}
  threading.Thread(target=lambda: [_do(job, scratch[job], corpus) for job in jobs],
                   name='background-jobs', daemon=True).start()


def result(job: Job, make_scratch: Callable[[str], pathlib.Path] | None = None,
           corpus=None) -> Any:
  """What `job` returned (waiting for it); its exception as a test failure."""
  if job not in _results:  # not started with the session: run it now
    _results[job] = threading.Event()
    _do(job, make_scratch(job.__name__), corpus)
  _results[job].wait()
  ok, value = _values[job]
  if not ok:
    raise AssertionError(f'background job {job.__name__} failed:\n{value}')
  return value


def stop() -> None:
  """Kills the processes of a job still running (the session ended early)."""
  _cancelled.set()
  with _lock:
    for proc in list(_running):
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
