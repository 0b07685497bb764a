"""Shared pieces of the benchmarks: configs by name, timing, the CPU matmul peak."""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import tiny, v52  # noqa: E402
from tokcom_jax.models import flops  # noqa: E402

# A mid size between tiny and v5.2 that a CPU steps through in seconds.
BENCH = ('vae.hidden_size=256,vae.encoder_layers=4,vae.decoder_layers=4,'
         'vae.num_heads=4,vae.num_kv_heads=2,vae.intermediate_size=768,'
         'vae.latent_dim=64,dit.hidden_size=256,dit.num_layers=8,dit.num_heads=4,'
         'dit.num_kv_heads=2,dit.intermediate_size=768,max_length=256,batch_size=16,'
         'vocab_size=4096')


def get_config(name: str, stage: str, dtype: str, batch_size: int | None = None):
  extra = f',compute_dtype={dtype}' + (f',batch_size={batch_size}' if batch_size
                                       else '')
  if name == 'tiny':
    return tiny.get_config(stage + extra)
  if name == 'bench':
    return tiny.get_config(f'{stage},{BENCH}{extra}')
  if name == 'v52':
    return v52.get_config(stage + extra)
  raise SystemExit(f'error: unknown config {name!r}: use tiny, bench or v52.')


def timed(fn, steps: int) -> float:
  """Seconds per call of fn() (which must block until its work is done)."""
  start = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - start) / steps


def peak_flops(dtype: str) -> tuple[float, str]:
  """Per-device dense peak: the table for accelerators, measured on a CPU."""
  device = jax.devices()[0]
  known = flops.peak_flops_per_device(device.device_kind)
  if known is not None:
    return known, f'table ({device.device_kind})'
  n = 2048
  a = jnp.ones((n, n), jnp.dtype(dtype))
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  seconds = min(timed(lambda: mm(a).block_until_ready(), 3) for _ in range(3))
  return 2 * n ** 3 / seconds, f'measured {n}x{n} {dtype} matmul on {device.platform}'


def emit(row: dict) -> None:
  print(json.dumps(row), flush=True)


def device_name() -> str:
  d = jax.devices()[0]
  return f'{jax.device_count()}x {d.device_kind} ({d.platform})'
