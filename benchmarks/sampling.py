"""Sampling throughput: 50 Euler steps over all latents at once (or per chunk, for a
config with flow.order=chunkwise; or, flow.order=head, one trunk step per chunk and
the head's Euler steps), against autoregressive decoding
with a KV cache by a causal transformer of the same width and depth (Hugging Face
`transformers` Qwen2, PyTorch `generate`; or this package's `ar` stage).

    python benchmarks/sampling.py --quick                 # CPU, under 2 minutes
    python benchmarks/sampling.py --config v52 --tokens 1024 --batch_sizes 1,8
    python benchmarks/sampling.py --quick --baseline jax  # against the ar stage, no torch

One JSON line per batch size: tokens/s of both, their ratio, and what one step
costs each: a pass of the flow model (over all N latents; 50 per sample in parallel
order, 50 per chunk in chunkwise order; the decoder's cost spread over them) and one
autoregressive token step (the prefill spread over the tokens).
"""

from __future__ import annotations

import argparse
import types

import common
import jax
import jax.numpy as jnp
from flax import nnx

from tokcom_jax import stages
from tokcom_jax.inference import tokcom
from tokcom_jax.models import flow, lm


def tokcom_seconds(config, batch: int, tokens: int, steps: int, repeats: int):
  """Seconds to generate `batch` texts of `tokens` tokens: noise → 50 Euler steps of
  the flow model → VAE decoder, argmax (random weights: the cost is the same)."""
  params = lambda stage: nnx.to_pure_dict(nnx.state(
      stages.get(config, stage).build(nnx.Rngs(0))))
  no_text = types.SimpleNamespace(eos_token_id=0)  # token ids only: no tokenizer
  model = tokcom.TokCom(config, no_text, params('vae'), params('diffusion'))
  N, Z = tokens // config.chunk_size, config.vae.latent_dim
  x0 = flow.sample_noise(jax.random.key(0), (batch, N, Z), config.flow.noise_std)
  mask, known = jnp.zeros((batch, N), bool), jnp.zeros((batch, N, Z))

  def one():
    if config.flow.order == 'head':  # the whole sequence one compiled loop
      model.sample(batch, steps=steps)  # (the tokens come back to the host)
      return
    z = model._sample_latents(model.dit_params, x0, steps, mask, known)
    model._decode(model.vae_params, z, jax.random.key(1), 0.0, 0, 1.0
                  ).block_until_ready()
  one()
  return common.timed(one, repeats)


def jax_autoregressive_seconds(config, batch: int, tokens: int, repeats: int):
  """The same for this package's `ar` stage at the flow model's size: one prefill,
  then one token per step with a KV cache (`lm.generate`), greedy."""
  config = config.copy_and_resolve_references()
  config.ar.update({k: config.dit[k] for k in (
      'hidden_size', 'num_layers', 'num_heads', 'num_kv_heads', 'intermediate_size')})
  graphdef, params = nnx.split(stages.get(config, 'ar').build(nnx.Rngs(0)))
  buffer = jnp.ones((batch, tokens + 1), jnp.int32)

  def one():
    lm.generate(graphdef, params, buffer, 1, jax.random.key(0)).block_until_ready()
  one()
  return common.timed(one, repeats), 'tokcom_jax ar stage, KV cache'


def autoregressive_seconds(config, batch: int, tokens: int, repeats: int, dtype: str):
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM
  d = config.dit
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = Qwen2ForCausalLM(Qwen2Config(
      vocab_size=config.vocab_size, hidden_size=d.hidden_size,
      intermediate_size=d.intermediate_size, num_hidden_layers=d.num_layers,
      num_attention_heads=d.num_heads, num_key_value_heads=d.num_kv_heads,
      max_position_embeddings=tokens + 8, attn_implementation='sdpa',
      eos_token_id=None, pad_token_id=0)).to(
          device, torch.bfloat16 if dtype == 'bfloat16' else torch.float32).eval()
  prompt = torch.ones((batch, 1), dtype=torch.long, device=device)

  def one():
    with torch.no_grad():
      out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens,
                           do_sample=False, use_cache=True)
    assert out.shape[1] == tokens + 1
    if device == 'cuda':
      torch.cuda.synchronize()
  one()
  return common.timed(one, repeats), f'torch {torch.__version__} sdpa, {device}'


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', default='bench', help='tiny, bench or v52')
  p.add_argument('--tokens', type=int, default=1024)
  p.add_argument('--steps', type=int, default=None,
                 help="Euler steps (default: the config's sample.steps)")
  p.add_argument('--batch_sizes', default='1,8')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--dtype', default=None)
  p.add_argument('--baseline', default='torch', choices=('torch', 'jax'),
                 help='the autoregressive model: HF Qwen2 in PyTorch, or the ar stage')
  p.add_argument('--order', default=None, choices=('parallel', 'chunkwise', 'head'),
                 help="the flow's order (default: the config's)")
  p.add_argument('--quick', action='store_true', help='CPU-sized: tiny, 256 tokens')
  p.add_argument('--set', default='', help='config modifiers, e.g. scan_layers=False')
  args = p.parse_args()
  if args.quick:
    args.config, args.tokens, args.repeats = 'tiny', 256, 1
  dtype = args.dtype or ('float32' if jax.default_backend() == 'cpu' else 'bfloat16')
  config = common.get_config(args.config, ','.join(filter(None, ['diffusion',
                                                                  args.set])), dtype)
  config.unlock()
  config.max_length = args.tokens  # positions are RoPE: any length works
  config.flow.order = args.order or config.flow.order
  config.lock()
  args.steps = args.steps or config.sample.steps
  passes = args.steps * (args.tokens // config.chunk_size
                          if config.flow.order == 'chunkwise' else 1)
  if config.flow.order == 'head':  # a pass: one chunk's trunk step and head steps
    passes = args.tokens // config.chunk_size
  for batch in map(int, args.batch_sizes.split(',')):
    tc = tokcom_seconds(config, batch, args.tokens, args.steps, args.repeats)
    if args.baseline == 'jax':
      ar, backend = jax_autoregressive_seconds(config, batch, args.tokens, args.repeats)
    else:
      ar, backend = autoregressive_seconds(config, batch, args.tokens, args.repeats,
                                           dtype)
    common.emit({'bench': 'sampling', 'config': args.config, 'dtype': dtype,
                 'batch': batch, 'tokens': args.tokens,
                 'tokcom_steps': args.steps, 'tokcom_order': config.flow.order,
                 'tokcom_tokens_per_sec': batch * args.tokens / tc,
                 'autoregressive_tokens_per_sec': batch * args.tokens / ar,
                 'tokcom_over_autoregressive': ar / tc,
                 'ms_per_flow_pass': 1e3 * tc / passes,
                 'ms_per_autoregressive_token_step': 1e3 * ar / args.tokens,
                 'scan_layers': config.scan_layers,
                 'autoregressive': backend, 'device': common.device_name()})


if __name__ == '__main__':
  main()
