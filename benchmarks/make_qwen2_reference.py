"""Writes tests/data/qwen2_reference.npz: outputs of Hugging Face Qwen2 modules.

`tokcom_jax.models.layers` copies Qwen2's transformer; tests/test_reference.py checks it
against these numbers without needing PyTorch. Regenerate (from the repo root, with
`pip install -r benchmarks/requirements-bench.txt`) with

    .venv/bin/python benchmarks/make_qwen2_reference.py

Every parameter is random (non-zero biases, norm scales away from 1) so that a
dropped bias or a wrong layout shows, and RMSNorm also sees an input whose mean
square is about eps, so that a wrong eps shows. Weights are stored in our layout
under `<case>.params.<path of the nnx.Param in our module>`; everything is float32
(config values are 0-d arrays), so np.load(..., allow_pickle=False) reads it.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from transformers import Qwen2Config
from transformers.models.qwen2 import modeling_qwen2 as qwen2


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, 'tests', 'data', 'qwen2_reference.npz')

B, T = 2, 7  # T odd so no power-of-two coincidence hides a bug
D, N, K, F = 32, 4, 2, 48
H = D // N
THETA, EPS, LAYERS = 10_000.0, 1e-6, 2


def make_config() -> Qwen2Config:
  # Eager attention: its mask is exactly the additive mask we pass (None: no mask).
  # SDPA would turn a None mask into is_causal=True, hiding the bidirectional case.
  return Qwen2Config(
      vocab_size=16, hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS,
      num_attention_heads=N, num_key_value_heads=K, rms_norm_eps=EPS,
      max_position_embeddings=64, hidden_act='silu',
      rope_parameters={'rope_type': 'default', 'rope_theta': THETA},
      attn_implementation='eager')


@torch.no_grad()
def randomize(module: torch.nn.Module) -> None:
  """Every parameter random: matrices ~N(0, 1.5²/fan_in), biases ~N(0, 0.5²),
  norm scales 1 + N(0, 0.3²). Big enough that attention is far from uniform."""
  done = set()
  for sub in module.modules():
    if isinstance(sub, qwen2.Qwen2RMSNorm):
      sub.weight.copy_(1 + 0.3 * torch.randn_like(sub.weight))
    elif isinstance(sub, torch.nn.Linear):
      sub.weight.copy_(torch.randn_like(sub.weight) * 1.5 / sub.in_features ** 0.5)
      if sub.bias is not None:
        sub.bias.copy_(0.5 * torch.randn_like(sub.bias))
    elif isinstance(sub, torch.nn.Embedding):
      sub.weight.normal_()
    done.update(id(p) for p in sub.parameters(recurse=False))
  missed = [n for n, p in module.named_parameters() if id(p) not in done]
  assert not missed, f'parameters left at their init: {missed}'


def np32(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy().astype(np.float32)


def norm_params(norm) -> dict[str, np.ndarray]:
  return {'scale': np32(norm.weight)}


def mlp_params(mlp) -> dict[str, np.ndarray]:
  # torch Linear weight is [out, in]; nnx.Linear kernel is [in, out].
  return {f'{ours}.kernel': np32(getattr(mlp, theirs).weight.T)
          for ours, theirs in (('gate', 'gate_proj'), ('up', 'up_proj'),
                               ('down', 'down_proj'))}


def attention_params(attn) -> dict[str, np.ndarray]:
  # q_proj output features are head-major (view(..., N, H)), so [D, N*H] -> [D, N, H].
  out = {}
  for ours, theirs, heads in (('query', 'q_proj', N), ('key', 'k_proj', K),
                              ('value', 'v_proj', K)):
    proj = getattr(attn, theirs)
    out[f'{ours}.kernel'] = np32(proj.weight.T.reshape(D, heads, H))
    out[f'{ours}.bias'] = np32(proj.bias.reshape(heads, H))
  out['out.kernel'] = np32(attn.o_proj.weight.T.reshape(N, H, D))
  return out


def layer_params(layer) -> dict[str, np.ndarray]:
  out = {}
  for prefix, params in (('attn_norm', norm_params(layer.input_layernorm)),
                         ('attn', attention_params(layer.self_attn)),
                         ('mlp_norm', norm_params(layer.post_attention_layernorm)),
                         ('mlp', mlp_params(layer.mlp))):
    out.update({f'{prefix}.{k}': v for k, v in params.items()})
  return out


def causal_mask() -> torch.Tensor:
  """Additive [1, 1, T, T] mask as eager attention takes it."""
  return torch.full((T, T), torch.finfo(torch.float32).min).triu(1)[None, None]


def build() -> dict[str, np.ndarray]:
  torch.manual_seed(0)
  cfg = make_config()
  x_BTD = torch.randn(B, T, D)
  x_small_BTD = 1e-3 * torch.randn(B, T, D)  # mean square ~1e-6 = eps
  position_ids = torch.arange(T)[None]
  rope = qwen2.Qwen2RotaryEmbedding(cfg)
  cos_sin = rope(x_BTD, position_ids)

  arrays = {
      'config.hidden_size': D, 'config.num_heads': N, 'config.num_kv_heads': K,
      'config.intermediate_size': F, 'config.num_layers': LAYERS,
      'config.rope_theta': THETA, 'config.rms_eps': EPS,
      'inputs.x': np32(x_BTD), 'inputs.x_small': np32(x_small_BTD),
  }

  def add(case, params, **outputs):
    arrays.update({f'{case}.params.{k}': v for k, v in params.items()})
    arrays.update({f'{case}.{k}': np32(v) for k, v in outputs.items()})

  with torch.no_grad():
    norm = qwen2.Qwen2RMSNorm(D, eps=EPS)
    randomize(norm)
    add('rms_norm', norm_params(norm), out=norm(x_BTD), out_small=norm(x_small_BTD))

    mlp = qwen2.Qwen2MLP(cfg)
    randomize(mlp)
    add('mlp', mlp_params(mlp), out=mlp(x_BTD))

    attn = qwen2.Qwen2Attention(cfg, layer_idx=0).eval()
    randomize(attn)
    out_causal, _ = attn(x_BTD, cos_sin, causal_mask())
    out_bidirectional, _ = attn(x_BTD, cos_sin, None)
    assert not torch.allclose(out_causal, out_bidirectional)
    add('attention', attention_params(attn), out_causal=out_causal,
        out_bidirectional=out_bidirectional)

    layer = qwen2.Qwen2DecoderLayer(cfg, layer_idx=0).eval()
    randomize(layer)
    add('block', layer_params(layer), out=layer(
        x_BTD, attention_mask=causal_mask(), position_ids=position_ids,
        position_embeddings=cos_sin))

    model = qwen2.Qwen2Model(cfg).eval()
    randomize(model)
    out = model(inputs_embeds=x_BTD).last_hidden_state
    # The model builds its own mask and positions; check them against ours.
    h_BTD = x_BTD
    for layer in model.layers:
      h_BTD = layer(h_BTD, attention_mask=causal_mask(), position_ids=position_ids,
                    position_embeddings=cos_sin)
    torch.testing.assert_close(out, model.norm(h_BTD), rtol=0, atol=0)
    params = {'final_norm.scale': np32(model.norm.weight)}
    for i, layer in enumerate(model.layers):
      params.update({f'blocks.{i}.{k}': v for k, v in layer_params(layer).items()})
    add('transformer', params, out=out)

  return {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=DEFAULT_OUT)
  args = parser.parse_args()
  arrays = build()
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  np.savez_compressed(args.out, **arrays)
  print(f'wrote {len(arrays)} arrays, {os.path.getsize(args.out)} bytes to {args.out}')


if __name__ == '__main__':
  main()
