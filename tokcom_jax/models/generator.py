"""The chunk generator (`flow.order = 'head'`): a causal trunk over chunk positions,
run once per chunk, and a small head that draws each chunk's latent from the trunk's
state (CALM's and MAR's design).

The trunk's input at position n is chunk n-1 (a learned start vector at n = 0): its K
token ids (embedded, concatenated, through a small MLP; `head.input = 'tokens'`,
CALM's best input) or its latent (`'latent'`). Its state h_n therefore depends on
chunks < n only, and the head turns h_n into chunk n's latent: a flow head
(`head.FlowHead`, Euler steps of flow matching on the straight path of
`tokcom_jax.models.flow`) or an energy head (one pass). With `head.token_loss` the
trunk state also predicts chunk n's K tokens through a linear layer (a next-chunk
cross-entropy, what an AR model learns), so that the state the head reads carries
the context.

Training runs the trunk once over a window and the head on `batch_mul` draws of
(noise, t) per position (MAR's `diffusion_batch_mul`); sampling
(`samplers.head_sample`) runs one trunk step per chunk over a KV cache, the head's
steps, the VAE decoder on the chunk, and feeds the decoded tokens back in.

B batch, L tokens, K chunk size, N = L/K chunks, D trunk width, Z latent size,
V vocab, M = B·N·batch_mul head rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tokcom_jax.models import axes, dit, flow, head as head_lib, layers, samplers

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class GeneratorConfig(layers.StackFields):
  latent_dim: int
  num_layers: int
  vocab_size: int
  chunk_size: int
  head: head_lib.HeadConfig = dataclasses.field(default_factory=head_lib.HeadConfig)
  standardize: bool = False  # keep per-dimension latent statistics (flow.py)
  self_condition: bool = False  # the flow head reads its previous x1 estimate

  @property
  def transformer(self) -> layers.TransformerConfig:
    return layers.stack_config(self, self.num_layers, True)

  @classmethod
  def from_config(cls, config) -> 'GeneratorConfig':
    """The trunk from `config.dit`, the head from `config.head`."""
    return cls(latent_dim=config.vae.latent_dim, vocab_size=config.vocab_size,
               chunk_size=config.chunk_size, head=head_lib.HeadConfig.from_config(config),
               standardize=config.flow.standardize,
               self_condition=config.flow.self_condition,
               **layers.stack_options(config), **layers.section_fields(cls, config.dit))


class ChunkGenerator(nnx.Module, dit.LatentUnits):

  def __init__(self, cfg: GeneratorConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, Z, K, V = cfg.hidden_size, cfg.latent_dim, cfg.chunk_size, cfg.vocab_size
    if cfg.head.input == 'tokens':
      self.embed = nnx.Embed(
          V, D, dtype=cfg.dtype,
          embedding_init=axes.partitioned(layers.default_init, 'vocab', 'embed'),
          rngs=rngs)
      self.chunk_in = layers.dense(K * D, D, ('mlp', 'embed'), dtype=cfg.dtype,
                                   use_bias=True, rngs=rngs)
      self.chunk_mix = layers.dense(D, D, ('embed', 'embed_out'), dtype=cfg.dtype,
                                    use_bias=True, rngs=rngs)
    else:
      self.chunk_in = layers.dense(Z, D, ('latent', 'embed'), dtype=cfg.dtype,
                                   use_bias=True, rngs=rngs)
    self.start = nnx.Param(axes.partitioned(nnx.initializers.normal(0.02), 'embed')(
        rngs.params(), (D,), jnp.float32))
    self.trunk = layers.Transformer(cfg.transformer, rngs=rngs)
    if cfg.head.kind == 'energy':
      self.head = head_lib.EnergyHead(cfg.head, D, Z, rngs=rngs)
    else:
      self.head = head_lib.FlowHead(cfg.head, D, Z, self_condition=cfg.self_condition,
                                    rngs=rngs)
    if cfg.head.token_loss > 0:
      self.token_head = layers.dense(D, K * V, ('embed', 'vocab'), dtype=cfg.dtype,
                                     rngs=rngs)
    self.init_latent_stats(Z)

  def chunk_input(self, tokens_BTK: Array, x_BTZ: Array) -> Array:
    """What the trunk reads after chunks [B, T]: their token ids [B, T, K] or their
    latents in the flow's units [B, T, Z] (by `head.input`) → [B, T, D]."""
    if self.cfg.head.input != 'tokens':
      return self.chunk_in(x_BTZ.astype(self.cfg.dtype))
    B, T, K = tokens_BTK.shape
    e_BTI = self.embed(tokens_BTK).reshape(B, T, K * self.cfg.hidden_size)
    return self.chunk_mix(jax.nn.silu(self.chunk_in(e_BTI)))

  def start_input(self, batch: int) -> Array:
    """The trunk's input at chunk 0 [B, 1, D]."""
    return jnp.broadcast_to(self.start[...].astype(self.cfg.dtype),
                            (batch, 1, self.cfg.hidden_size))

  def states(self, tokens_BL: Array, x1_BNZ: Array) -> Array:
    """The trunk's state at every chunk [B, N, D]: h_n reads chunks < n only."""
    B, N, _ = x1_BNZ.shape
    inputs_BND = self.chunk_input(tokens_BL.reshape(B, N, -1), x1_BNZ)
    shifted_BND = jnp.concatenate([self.start_input(B), inputs_BND[:, :-1]], axis=1)
    return self.trunk(shifted_BND)

  def init_cache(self, batch: int, length: int):
    return self.trunk.init_cache(batch, length)

  def step(self, input_B1D: Array, caches, index: Array):
    """One trunk step at chunk `index` over the cache of the chunks before:
    (state [B, 1, D], caches), what `states` gives there."""
    return self.trunk.decode(input_B1D, caches, index)

  def next_token_logits(self, h_BND: Array) -> Array:
    """The token head's logits for each chunk's K tokens [B, N, K, V] (fp32)."""
    B, N, _ = h_BND.shape
    return self.token_head(h_BND).astype(jnp.float32).reshape(
        B, N, self.cfg.chunk_size, self.cfg.vocab_size)


def _rows(a_BNX: Array, m: int) -> Array:
  """[B, N, X] → [B·N·m, X]: each position's row repeated m times, in place."""
  return jnp.repeat(a_BNX.reshape(-1, a_BNX.shape[-1]), m, axis=0)


def loss_fn(model: ChunkGenerator, tokens_BL: Array, x1_BNZ: Array, rng: Array,
            cfg: flow.FlowConfig, *, t: float | Array | None = None,
            states_BND: Array | None = None, decoded_metrics=None
            ) -> tuple[Array, dict[str, Array]]:
  """The generator's objective on windows `tokens_BL` whose latents (in the flow's
  units) are `x1_BNZ`: the head's loss on `batch_mul` draws per position (flow
  matching at times from `rng`, or all at `t`; or the energy score) + the token
  loss. `states_BND` replaces the trunk's states (the context-use measurement);
  `decoded_metrics(x1_pred [B', N, Z], tokens [B', L])` (the frozen decoder's
  `ce`, `token_accuracy`, …) scores the head's x1 predictions, its CE × `cfg.ce_weight`
  in the loss."""
  hc = model.cfg.head
  B, N, Z = x1_BNZ.shape
  h_BND = model.states(tokens_BL, x1_BNZ) if states_BND is None else states_BND
  m = hc.batch_mul
  x1_MZ = _rows(x1_BNZ, m)
  noise_rng, t_rng, sc_rng = jax.random.split(rng, 3)
  metrics = {}
  if hc.kind == 'energy':  # batch_mul samples per position, scored together
    noise_SMZ = jax.random.uniform(noise_rng, (m, B * N, Z)) - 0.5
    h_MD = jnp.tile(h_BND.reshape(B * N, -1), (m, 1))
    samples_SMZ = model.head(noise_SMZ.reshape(-1, Z), h_MD).reshape(m, B * N, Z)
    metrics['energy'] = jnp.mean(head_lib.energy_score(samples_SMZ, x1_MZ[::m]))
    x1_pred_MZ = samples_SMZ.transpose(1, 0, 2).reshape(-1, Z)
    metrics['mse'] = jnp.mean(jnp.square(x1_pred_MZ - x1_MZ))
    loss = metrics['energy']
  else:
    h_MD = _rows(h_BND, m)
    M = x1_MZ.shape[0]
    t_M = (flow.sample_t(t_rng, M, cfg.t_schedule, cfg.t_mean, cfg.t_std, cfg.t_shift)
           if t is None else jnp.broadcast_to(jnp.asarray(t, jnp.float32), (M,)))
    x0_MZ = flow.sample_noise(noise_rng, x1_MZ.shape, cfg.noise_std)
    x_t_MZ = flow.interpolate(x0_MZ, x1_MZ, t_M)
    x1_prev_MZ = None
    if model.cfg.self_condition:  # half the rows see the head's own first estimate
      estimate = jax.lax.stop_gradient(model.head.x1(x_t_MZ, t_M, h_MD))
      use_M1 = jax.random.bernoulli(sc_rng, 0.5, (M, 1))
      x1_prev_MZ = jnp.where(use_M1, estimate, 0.0)
    out_MZ = model.head(x_t_MZ, t_M, h_MD, x1_prev_MZ)
    if hc.predict == 'x1':
      x1_pred_MZ, target_MZ = out_MZ, x1_MZ
    else:
      x1_pred_MZ = x_t_MZ + (1.0 - t_M)[:, None] * out_MZ
      target_MZ = x1_MZ - x0_MZ
    metrics['mse'] = jnp.mean(jnp.square(x1_pred_MZ - x1_MZ))  # in x1's units
    loss = cfg.mse_weight * jnp.mean(jnp.square(out_MZ - target_MZ))
    if hc.shortcut_from:  # one more draw per position, for the step sizes
      metrics['shortcut_mse'] = head_lib.shortcut_loss(
          model.head, x1_BNZ.reshape(B * N, Z), h_BND.reshape(B * N, -1),
          jax.random.fold_in(rng, 3), cfg.noise_std)
      loss = loss + cfg.mse_weight * metrics['shortcut_mse']
  if hc.token_loss > 0:
    logits_BNKV = model.next_token_logits(h_BND)
    target_BNK = tokens_BL.reshape(B, N, -1)
    metrics['next_chunk_ce'] = jnp.mean(
        optax.softmax_cross_entropy_with_integer_labels(logits_BNKV, target_BNK))
    metrics['next_chunk_accuracy'] = jnp.mean(
        (jnp.argmax(logits_BNKV, -1) == target_BNK).astype(jnp.float32))
    loss = loss + hc.token_loss * metrics['next_chunk_ce']
  if decoded_metrics is not None:  # [B·N·m, Z] → [B·m, N, Z], rows (b, j)
    x1_pred_bNZ = x1_pred_MZ.reshape(B, N, m, Z).transpose(0, 2, 1, 3).reshape(-1, N, Z)
    if not cfg.ce_weight:
      x1_pred_bNZ = jax.lax.stop_gradient(x1_pred_bNZ)
    metrics.update(decoded_metrics(x1_pred_bNZ, jnp.repeat(tokens_BL, m, axis=0)))
    loss = loss + cfg.ce_weight * metrics['ce']
  metrics['loss'] = loss
  return loss, metrics


def reflow_times(max_steps: int) -> Array:
  """The times a sampler of 1 to `max_steps` uniform steps visits: {i/S : i < S}."""
  return jnp.asarray(sorted({i / s for s in range(1, max_steps + 1) for i in range(s)}),
                     jnp.float32)


def reflow_loss(student: ChunkGenerator, teacher: ChunkGenerator, tokens_BL: Array,
                x1_BNZ: Array, rng: Array, *, teacher_steps: int, max_steps: int,
                batch_mul: int, noise_std: float) -> tuple[Array, dict[str, Array]]:
  """Reflow (Liu et al. 2022, "Flow Straight and Fast") of the student's head onto
  the teacher's: from a starting noise x0 (std `noise_std`, the sampler's), the
  teacher's head takes `teacher_steps` Euler steps to x1*; the student's head,
  conditioned on the teacher's trunk states of the window, predicts x1* from x_t on
  the straight line x0 → x1* at the times of samplers of 1 to `max_steps` steps. Its
  mean squared error. A head that predicts x1* exactly lands there in one step.
  `x1_BNZ`: the window's latents in the flow's units (what a latent-reading trunk
  reads)."""
  B, N, Z = x1_BNZ.shape
  h_MD = _rows(jax.lax.stop_gradient(teacher.states(tokens_BL, x1_BNZ)), batch_mul)
  M = h_MD.shape[0]
  noise_rng, t_rng = jax.random.split(rng)
  x0_MZ = flow.sample_noise(noise_rng, (M, Z), noise_std)
  target_MZ = jax.lax.stop_gradient(samplers.head_latents(
      teacher, h_MD, x0_MZ, teacher_steps, rng))
  times = reflow_times(max_steps)
  t_M = times[jax.random.randint(t_rng, (M,), 0, times.shape[0])]
  pred_MZ = student.head.x1(flow.interpolate(x0_MZ, target_MZ, t_M), t_M, h_MD)
  mse = jnp.mean(jnp.square(pred_MZ - target_MZ))
  return mse, {'loss': mse, 'reflow_mse': mse}
