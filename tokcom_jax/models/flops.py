"""Model FLOPs of a training step, counted the MaxText way, and peak FLOP/s.

The counts are per model; each stage (`tokcom_jax.stages`) says which of them one of
its training steps runs, and how often (`Stage.train_flops`).

Counted: every learnable-weight matmul (2 FLOPs per multiply-add) and attention's
scores and values (halved when causal), forward once and backward twice (×3 in all).
Stage 2 trains the flow transformer (×3); the frozen VAE encoder runs forward only
(×1); the frozen decoder runs forward and backward through its activations, but its
weight gradients are never formed (×2). Elementwise work (norms, RoPE, softmax) is
left out, as MFU conventions do.
"""

from __future__ import annotations

import dataclasses

from tokcom_jax.models.head import HeadConfig

# Dense bf16 peak per device, FLOP/s (no sparsity).
PEAK_BF16 = {
    'H100': 989e12, 'H200': 989e12, 'TPU v4': 275e12, 'TPU v5 lite': 197e12,
    'TPU v5e': 197e12, 'TPU v5p': 459e12, 'TPU v5': 459e12,
}


def peak_flops_per_device(device_kind: str) -> float | None:
  """Known peak for a `jax.Device.device_kind`; None (measure it) otherwise."""
  for name, peak in sorted(PEAK_BF16.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in device_kind.lower():
      return peak
  return None


@dataclasses.dataclass(frozen=True)
class Stack:
  """A stack of Qwen2-style blocks applied to `sequences` sequences of `length`."""
  layers: int
  hidden: int
  heads: int
  kv_heads: int
  mlp: int
  causal: bool

  def weight_flops_per_token(self) -> int:
    d, hd = self.hidden, self.hidden // self.heads
    attn = d * self.heads * hd + 2 * d * self.kv_heads * hd + self.heads * hd * d
    return 2 * self.layers * (attn + 3 * d * self.mlp)

  def attention_flops_per_sequence(self, length: int) -> int:
    # QKᵀ and AV: 2 matmuls × 2 FLOPs × L² × heads × head_dim, per layer.
    full = 4 * length * length * self.hidden
    return self.layers * (full // 2 if self.causal else full)

  def forward(self, sequences: int, length: int) -> int:
    return sequences * (length * self.weight_flops_per_token()
                        + self.attention_flops_per_sequence(length))


def _stack(c, layers: int, causal: bool) -> Stack:
  return Stack(layers, c.hidden_size, c.num_heads, c.num_kv_heads,
               c.intermediate_size, causal)


def vae_forward(config, batch: int) -> dict[str, int]:
  """Forward FLOPs of the ChunkVAE on [batch, max_length] tokens, by part."""
  v, K = config.vae, config.chunk_size
  D, Z, V = v.hidden_size, v.latent_dim, config.vocab_size
  chunks = batch * config.max_length // K
  return {
      'encoder': _stack(v, v.encoder_layers, v.encoder_causal).forward(chunks, K)
                 + chunks * 2 * (2 * D * Z),  # to_mean, to_logvar
      'decoder': _stack(v, v.decoder_layers, v.decoder_causal).forward(chunks, K + 1)
                 + chunks * 2 * Z * D          # from_latent
                 + chunks * K * 2 * D * V,     # the unembedding
  }


def dit_forward(config, batch: int) -> int:
  """Forward FLOPs of the latent flow transformer on [batch, N, Z] latents, as
  training calls it: with the previous estimate's projection (self-conditioning) and,
  for a chunkwise model, the clean-context projection and a condition per chunk."""
  d, Z = config.dit, config.vae.latent_dim
  D, N = d.hidden_size, config.max_length // config.chunk_size
  chunkwise = config.flow.order == 'chunkwise'
  per_condition = (2 * (d.time_freq_dim * D + D * D)      # timestep MLP
                   + d.num_layers * 2 * D * 6 * D + 2 * D * 2 * D)  # adaLN modulations
  projections = 2 + config.flow.self_condition + chunkwise  # in, out, prev, context
  return (_stack(d, d.num_layers, False).forward(batch, N)  # XLA computes whole
          + batch * N * 2 * Z * D * projections             # attention, causal or not
          + batch * (N if chunkwise else 1) * per_condition)


def head_forward_per_row(config) -> int:
  """Forward FLOPs of the chunk generator's head on one row (one latent, one time)."""
  h, D, Z = config.head, config.dit.hidden_size, config.vae.latent_dim
  W = h.width
  energy = h.kind == 'energy'
  sc = config.flow.self_condition and not energy
  per_row = (2 * D * W + 2 * Z * (1 + sc) * W           # condition, input projection
             + h.blocks * (2 * 2 * W * W + 2 * W * 3 * W)  # MLPs, modulations
             + 2 * W * 2 * W + 2 * W * Z)                  # final layer
  if not energy:
    per_row += 2 * (HeadConfig().time_freq_dim * W + W * W)  # timestep MLP
  if not energy and h.get('condition', 'joint') == 'separate':  # the time's share
    per_row += 2 * W * (3 * h.blocks + 2) * W
  return per_row


def _trunk_forward(config, batch: int) -> int:
  """The trunk once over [batch, N] chunk positions and its chunk-input MLP."""
  d, h, K = config.dit, config.head, config.chunk_size
  D, Z, N = d.hidden_size, config.vae.latent_dim, config.max_length // K
  inputs = (2 * K * D * D + 2 * D * D) if h.input == 'tokens' else 2 * Z * D
  return _stack(d, d.num_layers, True).forward(batch, N) + batch * N * inputs


def generator_forward(config, batch: int) -> int:
  """Forward FLOPs of the chunk generator (`flow.order = 'head'`) on [batch, N]
  chunks as training calls it: the trunk once, the chunk-input MLP, the head on
  `batch_mul` rows per position (twice with self-conditioning: the estimate), the
  token head when it has a loss."""
  h, K, V = config.head, config.chunk_size, config.vocab_size
  D = config.dit.hidden_size
  positions = batch * (config.max_length // K)
  sc = config.flow.self_condition and h.kind != 'energy'
  token_head = positions * 2 * D * K * V if h.token_loss > 0 else 0
  return (_trunk_forward(config, batch)
          + positions * h.batch_mul * head_forward_per_row(config) * (1 + sc)
          + token_head)


def reflow(config, batch: int) -> int:
  """FLOPs of one reflow step (`stages.reflow`): the frozen encoder and the
  teacher's trunk forward, the teacher's head steps forward, the student's head
  forward and backward, on `reflow.batch_mul` rows per position."""
  rows = batch * (config.max_length // config.chunk_size) * config.reflow.batch_mul
  return (vae_forward(config, batch)['encoder'] + _trunk_forward(config, batch)
          + rows * head_forward_per_row(config) * (config.reflow.teacher_steps + 3))


def lm_forward(config, batch: int) -> int:
  """Forward FLOPs of the autoregressive LM on [batch, max_length] tokens: the causal
  stack and the unembedding (the embedding lookup is free)."""
  a, L = config.ar, config.max_length
  return (_stack(a, a.num_layers, True).forward(batch, L)
          + batch * L * 2 * a.hidden_size * config.vocab_size)


def tokens_per_step(config, batch: int | None = None) -> int:
  return (batch or config.train.batch_size) * config.max_length
