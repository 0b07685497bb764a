"""Train-step throughput and MFU of both stages, and the same VAE in PyTorch.

    pip install -r benchmarks/requirements-bench.txt
    python benchmarks/train_step.py --quick                    # CPU, under 2 minutes
    python benchmarks/train_step.py --configs bench,v52 --dtype bfloat16   # a GPU

One JSON line per (framework, config, stage): tokens/s, model FLOP/s, MFU against
the device's dense peak (measured with a jitted matmul on a CPU). The PyTorch line
times a chunk VAE of the same shapes built from Hugging Face `transformers` Qwen2
layers (forward + backward + AdamW on the same batch shape) in this same process,
and gives the JAX/PyTorch tokens/s ratio.
"""

from __future__ import annotations

import argparse

import common  # noqa: F401  (sets sys.path)
import jax
import numpy as np

from tokcom_jax import stages
from tokcom_jax.models import flops
from tokcom_jax.training import sharding, steps, train_state


def jax_step(config, stage: str, steps: int, warmup: int) -> float:
  """Seconds per train step of `stage`, random tokens, state donated as in training."""
  one = build_step(config, stage)
  for _ in range(warmup):
    one()
  return common.timed(one, steps)


def build_step(config, stage_name: str):
  """A function that runs one blocking train step of a stage on random tokens (the
  stage's frozen models, if any, randomly initialised: the cost is the same)."""
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  stage = stages.get(config, stage_name)
  optimizer, _ = train_state.make_optimizer(config.train, 1e-4, 1000)
  graphdef, state = train_state.init_state(stage.build, mesh, optimizer, 0)
  frozen_models = stage.frozen()
  frozen = {name: train_state.init_state(f.build, mesh, optimizer, 1)[1]['params']
            for name, f in frozen_models.items()}
  step = steps.make_train_step(
      stage, graphdef, train_state.frozen_graphdefs(frozen_models), optimizer,
      steps.shardings_of(state), steps.shardings_of(frozen), mesh)
  B, L = config.train.batch_size, config.max_length
  tokens = jax.device_put(
      np.random.default_rng(0).integers(0, config.vocab_size, (B, L), np.int32),
      sharding.batch_sharding(mesh))
  key = jax.random.key(0)
  box = [state]

  def one():
    box[0], metrics = step(box[0], tokens, key, frozen)
    metrics['loss'].block_until_ready()
  return one


def torch_vae_step(config, steps: int, warmup: int, dtype: str):
  """(seconds per step, attention backend) of the same chunk VAE in PyTorch."""
  import torch
  from transformers import Qwen2Config, Qwen2Model

  v, K = config.vae, config.chunk_size
  torch_dtype = torch.bfloat16 if dtype == 'bfloat16' else torch.float32
  device = 'cuda' if torch.cuda.is_available() else 'cpu'

  def stack(layers):
    return Qwen2Model(Qwen2Config(
        vocab_size=config.vocab_size, hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size, num_hidden_layers=layers,
        num_attention_heads=v.num_heads, num_key_value_heads=v.num_kv_heads,
        rope_theta=v.rope_theta, rms_norm_eps=v.rms_eps,
        max_position_embeddings=max(K + 1, 8), attn_implementation='sdpa'))

  class ChunkVAE(torch.nn.Module):
    def __init__(self):
      super().__init__()
      D, Z = v.hidden_size, v.latent_dim
      self.encoder, self.decoder = stack(v.encoder_layers), stack(v.decoder_layers)
      self.decoder.embed_tokens = None  # fed embeddings, as ours
      self.to_mean, self.to_logvar = torch.nn.Linear(D, Z), torch.nn.Linear(D, Z)
      self.from_latent = torch.nn.Linear(Z, D)
      self.omni = torch.nn.Parameter(torch.randn(K, D) * 0.02)
      self.lm_head = torch.nn.Linear(D, config.vocab_size, bias=False)

    def forward(self, tokens_BL):
      chunks = tokens_BL.reshape(-1, K)
      last = self.encoder(input_ids=chunks).last_hidden_state[:, -1]
      z = self.to_mean(last)
      h = torch.cat([self.from_latent(z)[:, None],
                     self.omni.expand(z.shape[0], K, -1)], dim=1)
      logits = self.lm_head(self.decoder(inputs_embeds=h).last_hidden_state[:, 1:])
      return torch.nn.functional.cross_entropy(
          logits.reshape(-1, logits.shape[-1]).float(), chunks.reshape(-1))

  model = ChunkVAE().to(device=device, dtype=torch_dtype)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  B, L = config.train.batch_size, config.max_length
  tokens = torch.randint(0, config.vocab_size, (B, L), device=device)

  def one():
    opt.zero_grad(set_to_none=True)
    loss = model(tokens)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if device == 'cuda':
      torch.cuda.synchronize()
  for _ in range(warmup):
    one()
  backend = f'sdpa (torch {torch.__version__}, {device}, {torch.get_num_threads()} threads)'
  return common.timed(one, steps), backend


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--configs', default=None, help='default tiny,bench (quick: tiny)')
  p.add_argument('--stages', default='vae,diffusion')
  p.add_argument('--dtype', default=None, help='float32 on CPU, bfloat16 elsewhere')
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--batch_size', type=int, default=None)
  p.add_argument('--no_torch', action='store_true')
  p.add_argument('--quick', action='store_true', help='few steps, CPU-sized')
  p.add_argument('--set', default='', help='config modifiers for every row, e.g.'
                 ' scan_layers=False,remat=full')
  args = p.parse_args()
  if args.quick:
    args.steps, args.warmup = 3, 1
  args.configs = args.configs or ('tiny' if args.quick else 'tiny,bench')
  dtype = args.dtype or ('float32' if jax.default_backend() == 'cpu' else 'bfloat16')
  peak, peak_source = common.peak_flops(dtype)
  common.emit({'bench': 'peak', 'flops_per_sec_per_device': peak,
               'source': peak_source, 'device': common.device_name()})
  for name in args.configs.split(','):
    for stage in args.stages.split(','):
      config = common.get_config(name, ','.join(filter(None, [stage, args.set])),
                                 dtype, args.batch_size)
      seconds = jax_step(config, stage, args.steps, args.warmup)
      tokens = flops.tokens_per_step(config)
      model_flops = stages.get(config, stage).train_flops(config.train.batch_size)
      row = {'bench': 'train_step', 'framework': 'jax', 'config': name,
             'stage': stage, 'dtype': dtype, 'batch': config.train.batch_size,
             'seq_len': config.max_length, 'step_ms': 1e3 * seconds,
             'tokens_per_sec': tokens / seconds,
             'model_flops_per_step': model_flops,
             'flops_per_sec': model_flops / seconds,
             'mfu': model_flops / seconds / (peak * jax.device_count()),
             'scan_layers': config.scan_layers, 'remat': config.remat,
             'set': args.set, 'device': common.device_name()}
      common.emit(row)
      if stage == 'vae' and not args.no_torch:
        t_seconds, backend = torch_vae_step(config, args.steps, args.warmup, dtype)
        common.emit({'bench': 'train_step', 'framework': 'torch', 'config': name,
                     'stage': stage, 'dtype': dtype, 'step_ms': 1e3 * t_seconds,
                     'tokens_per_sec': tokens / t_seconds,
                     'flops_per_sec': model_flops / t_seconds,
                     'mfu': model_flops / t_seconds / peak,
                     'attention': backend,
                     'jax_over_torch_tokens_per_sec': t_seconds / seconds})


if __name__ == '__main__':
  main()
