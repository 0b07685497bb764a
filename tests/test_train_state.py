"""The optimizer of every stage, pinned by numbers: the learning-rate schedule, which
parameters weight decay touches, and gradient accumulation through the real train
step. A silent change in any of them would still train, just differently."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import tiny
from tests import train_fixtures
from tokcom_jax import stages
from tokcom_jax.models import axes, layers, stacks
from tokcom_jax.training import sharding, steps, train_state


PEAK = 1e-3


def schedule(arg: str, total_steps: int):
  return train_state.make_optimizer(tiny.get_config(arg).train, PEAK, total_steps)[1]


def lrs(sched, n: int) -> np.ndarray:
  return np.array([float(sched(i)) for i in range(n)])


# ------------------------------------------------------------------------ schedule


def test_schedule_matches_hand_values():
  """warmup 4 of 10 updates: linear 0 → peak over updates 0..4, then cosine from
  peak to 0.1·peak over the remaining 6, i.e. 0.1 + 0.45·(1 + cos(π·t/6)) of peak at
  update 4 + t. Computed by hand, not by optax, so a change of formula shows."""
  sched = schedule('vae,warmup_steps=4', 10)
  by_hand = [0.0, 0.25, 0.5, 0.75, 1.0,  # warm-up
             0.9397114317, 0.775, 0.55, 0.325, 0.1602885683,  # cosine, t = 1..5
             0.1]  # t = 6: update 10, one past the last one applied (9)
  np.testing.assert_allclose(lrs(sched, 11), PEAK * np.array(by_hand), rtol=1e-6,
                             atol=1e-12)
  assert float(sched(0)) == 0.0
  assert float(sched(4)) == np.float32(PEAK)  # exactly the peak, not 0.99999·peak
  np.testing.assert_allclose(float(sched(10)), 0.1 * PEAK, rtol=1e-6)
  # After warm-up the floor is 0.1·peak: never below it, however long it is run.
  assert lrs(sched, 40)[4:].min() == pytest.approx(0.1 * PEAK, rel=1e-6)


def test_schedule_warms_up_monotonically_then_decays_to_the_floor():
  """A long schedule: strictly rising during warm-up, never rising after it, and at
  0.1·peak at the end (within the last update's cosine step)."""
  sched = schedule('vae,warmup_steps=20', 200)
  values = lrs(sched, 201)
  assert (np.diff(values[:21]) > 0).all()
  assert (np.diff(values[20:]) <= 0).all()
  assert values[20] == np.float32(PEAK)
  np.testing.assert_allclose(values[200], 0.1 * PEAK, rtol=1e-6)
  # The last update applied (199) is within (π/180)²/4 · 0.9 of the floor.
  np.testing.assert_allclose(values[199], PEAK * (0.1 + 0.45 * (1 + np.cos(
      np.pi * 179 / 180))), rtol=1e-6)


def test_schedule_counts_updates_not_micro_steps():
  """With grad_accum=k the schedule runs over total_steps // k updates (the
  MultiSteps-wrapped AdamW sees one count per k batches)."""
  np.testing.assert_array_equal(
      lrs(schedule('vae,warmup_steps=4,grad_accum=2', 20), 11),
      lrs(schedule('vae,warmup_steps=4', 10), 11))


def test_schedule_warmup_longer_than_the_run_still_reaches_the_peak():
  """warmup_steps is clamped to updates − 1, so a short run still trains at its peak
  lr on its last update; a one-update run uses the peak at once (not lr 0)."""
  sched = schedule('vae,warmup_steps=50', 10)
  assert float(sched(9)) == np.float32(PEAK)
  np.testing.assert_allclose(lrs(sched, 9), PEAK * np.arange(9) / 9, rtol=1e-6)
  assert float(schedule('vae,warmup_steps=50', 1)(0)) == np.float32(PEAK)


# ---------------------------------------------------------------------- weight decay


def micro_vae_params():
  """The micro VAE's parameters, layers in a Python loop (no data needed), every one
  nonzero: biases initialise to 0, and decay of a 0 is invisible."""
  config = train_fixtures.micro_config('files:unused/*.txt', 'unused')
  config.scan_layers = False
  model = nnx.eval_shape(lambda: stages.get(config).build(nnx.Rngs(0)))
  leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(nnx.state(model)))
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(treedef, [
      jax.random.uniform(k, x.shape, x.dtype, 0.5, 1.5) for k, x in zip(keys, leaves)])


def one_update_with_zero_gradients(params, weight_decay=0.5):
  tc = tiny.get_config(f'vae,warmup_steps=0,weight_decay={weight_decay}').train
  optimizer, sched = train_state.make_optimizer(tc, PEAK, 100)
  assert float(sched(0)) == np.float32(PEAK)

  @jax.jit
  def update(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    return optax.apply_updates(params, updates)
  return update(params)


@functools.cache
def decayed_micro_vae():
  """(params, params after one zero-gradient update), shared by the tests below."""
  params = micro_vae_params()
  return params, one_update_with_zero_gradients(params)


def test_weight_decay_shrinks_matrices_and_leaves_vectors_bit_identical():
  """With zero gradients AdamW's only move is decay: p ← p·(1 − lr·wd) for matrices
  and embeddings; norm scales and 1-D biases must not move by a single bit."""
  params, new = decayed_micro_vae()
  flat_old = dict(jax.tree_util.tree_leaves_with_path(params))
  vectors = matrices = 0
  for path, p in jax.tree_util.tree_leaves_with_path(new):
    old = np.asarray(flat_old[path])
    name = jax.tree_util.keystr(path)
    if old.ndim == 1:
      vectors += 1
      np.testing.assert_array_equal(np.asarray(p), old, err_msg=name)
    elif not name.endswith("['bias']"):
      matrices += 1
      np.testing.assert_allclose(np.asarray(p), old * (1 - PEAK * 0.5), rtol=1e-6,
                                 err_msg=name)
      assert not np.array_equal(np.asarray(p), old), name
  assert (vectors, matrices) == (9, 20)  # scales, 1-D biases; kernels, embeddings


def test_parameters_not_trainable_keep_every_bit_under_gradients_and_decay():
  """`make_optimizer(..., trainable)`: the encoder frozen, the rest trained: with
  gradients of ones and weight decay, the encoder does not move by a bit, the
  decoder's matrices do."""
  params = micro_vae_params()
  tc = tiny.get_config('vae,warmup_steps=0,weight_decay=0.5').train
  trainable = lambda path: stacks.key_name(path[0]) != 'encoder'
  optimizer, _ = train_state.make_optimizer(tc, PEAK, 100, trainable)
  updates, _ = jax.jit(optimizer.update)(jax.tree.map(jnp.ones_like, params),
                                         optimizer.init(params), params)
  new = optax.apply_updates(params, updates)
  frozen = moved = 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree.leaves(new)):
    if not trainable(path):
      frozen += 1
      np.testing.assert_array_equal(np.asarray(b), np.asarray(a),
                                    err_msg=jax.tree_util.keystr(path))
    else:
      moved += not np.array_equal(np.asarray(b), np.asarray(a))
  assert frozen > 5 and moved > 5


def test_a_scanned_stack_decays_exactly_what_the_loop_decays():
  """Stacked on a `layers` axis, norm scales are [L, D] and q/k/v biases [L, N, H]:
  the extra axis must not make them decayed (nor change anything else)."""
  params, new = decayed_micro_vae()
  stacked = stacks.stack_layers(params)
  assert np.asarray(stacked['encoder']['blocks']['attn_norm']['scale']).ndim == 2
  new_stacked = one_update_with_zero_gradients(stacked)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(new),
                          jax.tree.leaves(stacks.unstack_layers(new_stacked))):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a),
                                  err_msg=jax.tree_util.keystr(path))


def test_attention_biases_are_not_decayed():
  """Biases are vectors whatever their storage shape: attention's q/k/v biases are
  [heads, head_dim], and must not be decayed."""
  params, new = decayed_micro_vae()
  block = lambda t: t['encoder']['blocks'][0]['attn']['query']['bias']
  assert np.asarray(block(params)).ndim == 2
  np.testing.assert_array_equal(np.asarray(block(new)), np.asarray(block(params)))


# ----------------------------------------------------------- gradient accumulation


V, D, L = 16, 8, 33  # the tiny model's vocabulary, width, window length
K, B = 3, 2  # micro-batches per update, rows per micro-batch


class TinyLM(nnx.Module):
  """Embedding → RMSNorm → dense with bias: a matrix, a vector and a bias, with the
  package's logical axes, and a compile time of a second rather than the VAE's ten."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(
        V, D, embedding_init=axes.partitioned(nnx.initializers.normal(1.0),
                                                'vocab', 'embed'), rngs=rngs)
    self.norm = nnx.RMSNorm(D, scale_init=axes.partitioned(layers.ones_init,
                                                             'embed'), rngs=rngs)
    self.out = layers.dense(D, V, ('embed', 'vocab'), dtype=jnp.float32,
                            use_bias=True, kernel_init=nnx.initializers.normal(0.3),
                            rngs=rngs)

  def __call__(self, tokens_BL):
    return self.out(self.norm(self.embed(tokens_BL)))


class TinyStage:
  """What make_train_step asks of a stage: build and loss. The loss is a mean of
  next-token CE over a fixed number of tokens per row, like the VAE's, so the mean
  of k equal micro-batch means is the mean over the k·b rows; it draws nothing from
  the rng, so the step counter (which differs between the runs) cannot matter."""
  name = 'vae'

  def build(self, rngs):
    return TinyLM(rngs)

  def loss(self, model, frozen, tokens_BL, rng):
    ce = optax.softmax_cross_entropy_with_integer_labels(
        model(tokens_BL)[:, :-1], tokens_BL[:, 1:]).mean()
    return ce, {'loss': ce}


def accum_run(grad_accum: int, batches: list[np.ndarray], updates: int):
  """[(params, adam (mu, nu)) as numpy] before and after each call of the real
  jitted train step, with the real optimizer and train state."""
  tc = tiny.get_config(f'vae,grad_accum={grad_accum},warmup_steps=0').train
  mesh = sharding.make_mesh(-1, 1)
  stage = TinyStage()
  optimizer, _ = train_state.make_optimizer(tc, 1e-2, updates * grad_accum)
  graphdef, state = train_state.init_state(stage.build, mesh, optimizer, seed=0)
  step = steps.make_train_step(stage, graphdef, {}, optimizer,
                               steps.shardings_of(state), {}, mesh)

  def snapshot(state):
    adam = {jax.tree_util.keystr(p).rsplit('.', 1)[-1][:2]: x for p, x in
            jax.tree_util.tree_leaves_with_path(
                state['opt_state'], is_leaf=lambda x: isinstance(x, dict))
            if jax.tree_util.keystr(p).endswith(('.mu', '.nu'))}
    return jax.device_get((state['params'], (adam['mu'], adam['nu'])))

  history = [snapshot(state)]
  for tokens in batches:
    state, metrics = step(state, sharding.global_batch(tokens, mesh, len(tokens)),
                          jax.random.key(0), {})
    assert float(metrics['nonfinite_run']) == 0
    assert float(metrics['grad_norm']) < tc.grad_clip  # unclipped: sum ≠ mean shows
    history.append(snapshot(state))
  return history


def assert_trees_close(a, b, atol, rtol=0.0):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def test_grad_accum_equals_one_step_on_the_k_times_batch():
  """k micro-steps of b rows with grad_accum=k make the same two updates as one step
  each on the k·b rows (AdamW sees the mean gradient, once per k batches), and until
  the k-th micro-step nothing moves."""
  rng = np.random.default_rng(0)
  big = [rng.integers(0, V, (K * B, L), dtype=np.int32) for _ in range(2)]
  micro = [b[i * B:(i + 1) * B] for b in big for i in range(K)]
  accumulated = accum_run(K, micro, updates=2)
  direct = accum_run(1, big, updates=2)
  assert_trees_close(accumulated[0], direct[0], atol=0)  # the same start
  for i in range(1, K):  # micro-steps 1..k−1 only accumulate: bit-identical
    assert_trees_close(accumulated[i][0], accumulated[0][0], atol=0)
  moved = max(float(np.abs(x - y).max()) for x, y in zip(
      jax.tree.leaves(direct[1][0]), jax.tree.leaves(direct[0][0])))
  assert moved > 5e-3  # an Adam step of lr 1e-2, far above the tolerance below
  for update in (1, 2):
    params, (mu, nu) = accumulated[update * K]
    assert_trees_close(params, direct[update][0], atol=1e-6)
    # The moments are linear (mu) and quadratic (nu) in the gradient: a sum where a
    # mean belongs, or a dropped micro-batch, shows here even where Adam's
    # normalisation hides it in the parameters. Tolerances: float32 round-off of
    # entries ~1e-2 (mu) and ~1e-5 (nu).
    assert_trees_close(mu, direct[update][1][0], atol=1e-8, rtol=1e-5)
    assert_trees_close(nu, direct[update][1][1], atol=1e-11, rtol=1e-5)
