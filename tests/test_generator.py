"""The chunk generator (flow.order='head'): a causal trunk run once per chunk, a small
head per latent, the decoded tokens fed back."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tokcom_jax.models import flow, generator, head as head_lib, samplers

V, K, Z, N = 40, 4, 8, 5


def make(input='tokens', kind='flow', token_loss=0.5, self_condition=False, seed=0,
         **head):
  cfg = generator.GeneratorConfig(
      latent_dim=Z, num_layers=2, vocab_size=V, chunk_size=K, hidden_size=32,
      num_heads=2, num_kv_heads=1, intermediate_size=64, rope_theta=10_000.0,
      self_condition=self_condition,
      head=head_lib.HeadConfig(kind=kind, width=32, blocks=2, batch_mul=3,
                               input=input, token_loss=token_loss,
                               time_freq_dim=16, **head))
  model = generator.ChunkGenerator(cfg, rngs=nnx.Rngs(seed))
  # The zero-initialised output layers would make every prediction 0: give the head
  # random ones, so that predictions depend on their inputs.
  params = nnx.state(model, nnx.Param)
  key = jax.random.key(seed + 1)
  params = jax.tree.map(
      lambda p: (p if jnp.any(p != 0) else
                 0.3 * jax.random.normal(jax.random.fold_in(key, p.size), p.shape)),
      params)
  nnx.update(model, params)
  return model


def data(seed=0, B=3):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return (jax.random.randint(k1, (B, N * K), 0, V),
          jax.random.normal(k2, (B, N, Z)))


@pytest.mark.parametrize('input', ['tokens', 'latent'])
def test_trunk_state_at_chunk_n_reads_chunks_before_n_only(input):
  model = make(input)
  tokens, x1 = data()
  states = nnx.jit(lambda model, tokens, x: model.states(tokens, x))
  if input == 'latent':  # the Jacobian of h_n with respect to every chunk's latent
    jac = nnx.jit(lambda model, x: jax.jacobian(
        lambda x: model.states(tokens, x)[0])(x))(model, x1)  # [N, D, B, N, Z]
    moved = np.abs(np.asarray(jac[:, :, 0])).sum(axis=(1, 3))  # [n, m]
  else:  # tokens are integers: change chunk m's (row m+1 of one batch) and watch h_n
    rows = [tokens[0]] + [tokens[0].at[m * K:(m + 1) * K].set(
        (tokens[0, m * K:(m + 1) * K] + 1) % V) for m in range(N)]
    h = np.asarray(states(model, jnp.stack(rows), jnp.repeat(x1[:1], N + 1, 0)))
    moved = np.abs(h[1:] - h[:1]).sum(-1).T  # [n, m]
  assert np.all(moved[np.triu_indices(N)] == 0)  # chunk m >= n: no effect on h_n
  assert np.all(moved[np.tril_indices(N, -1)] > 0)  # chunk m < n: read


def _full_pass_sample(model, decode_chunk, x0_BNZ, steps):
  """The sampler written the slow way: every chunk's state from a full trunk pass
  over the chunks decoded so far."""
  B = x0_BNZ.shape[0]
  x = jnp.zeros_like(x0_BNZ)
  tokens = jnp.zeros((B, N * K), jnp.int32)
  for n in range(N):
    h_BD = model.states(tokens, x)[:, n]
    x_BZ, prev = x0_BNZ[:, n], jnp.zeros_like(x0_BNZ[:, n])
    for i in range(steps):
      t, t_next = samplers.step_times(i, steps, 1.0)
      prev = model.head.x1(x_BZ, jnp.full((B,), t), h_BD, prev)
      x_BZ = samplers.euler_step(x_BZ, prev, t, t_next)
    x = x.at[:, n].set(x_BZ)
    tokens = tokens.at[:, n * K:(n + 1) * K].set(
        decode_chunk(x_BZ[:, None], jnp.asarray([n]))[:, 0])
  return x, tokens


def _decode_chunk(z_BTZ, n_T):  # a stand-in decoder: tokens that depend on the latent
  return (jnp.floor(jnp.abs(z_BTZ[..., :K]) * 7).astype(jnp.int32)
          + n_T[None, :, None]) % V


@pytest.mark.parametrize('input,self_condition,condition', [
    ('tokens', True, 'joint'), ('latent', False, 'separate')])
def test_kv_cached_sampler_equals_a_full_pass_sampler(input, self_condition, condition):
  model = make(input, self_condition=self_condition, condition=condition)
  x0 = jax.random.normal(jax.random.key(3), (2, N, Z))
  x, tokens = jax.jit(lambda x0: samplers.head_sample(
      model, _decode_chunk, x0, 4, jax.random.key(0)))(x0)
  x_ref, tokens_ref = jax.jit(lambda x0: _full_pass_sample(model, _decode_chunk, x0, 4))(x0)
  np.testing.assert_allclose(x, x_ref, atol=2e-5)
  np.testing.assert_array_equal(tokens, tokens_ref)
  assert len(np.unique(np.asarray(tokens))) > 5  # the decoded tokens vary


def test_the_trunk_reads_the_tokens_the_sampler_decoded():
  model = make('tokens')
  x0 = jax.random.normal(jax.random.key(3), (2, N, Z))
  sample = lambda decode: samplers.head_sample(model, decode, x0, 3, jax.random.key(0))
  x, tokens = sample(_decode_chunk)
  other_x, other_tokens = sample(lambda z, n: (_decode_chunk(z, n) + 1) % V)
  # Chunk 0 is drawn before any decoding: the same; every later chunk differs,
  # because the trunk read different tokens.
  np.testing.assert_allclose(x[:, 0], other_x[:, 0], atol=1e-6)
  assert np.all(np.abs(np.asarray(x[:, 1:] - other_x[:, 1:])).sum(-1) > 1e-4)
  # And what it read are the tokens returned.
  np.testing.assert_array_equal(other_tokens[:, :K], (tokens[:, :K] + 1) % V)


def test_held_chunks_and_tokens_are_kept_and_read():
  model = make('tokens')
  B = 2
  x0 = jax.random.normal(jax.random.key(4), (B, N, Z))
  known = jax.random.normal(jax.random.key(5), (B, N, Z))
  prompt = jnp.asarray(np.arange(N * K) % V)[None].repeat(B, 0)
  token_mask = jnp.asarray(np.arange(N * K) < K + 2)[None].repeat(B, 0)  # 1½ chunks
  held = jnp.asarray(np.arange(N) < 1)[None].repeat(B, 0)
  x, tokens = samplers.head_sample(model, _decode_chunk, x0, 3, jax.random.key(0),
                                   known_mask_BN=held, known_BNZ=known,
                                   known_tokens_BL=prompt, known_token_mask_BL=token_mask)
  np.testing.assert_array_equal(x[:, 0], known[:, 0])
  np.testing.assert_array_equal(tokens[:, :K + 2], prompt[:, :K + 2])  # verbatim
  # The rest of the second chunk is what its latent decodes to.
  np.testing.assert_array_equal(tokens[:, K + 2:2 * K],
                                _decode_chunk(x[:, 1:2], jnp.asarray([1]))[:, 0, 2:])


def test_head_euler_loop_with_the_exact_predictor_reproduces_gaussian_data():
  """x1 ~ N(mu, s²) per dimension, x0 ~ N(0, σ²): E[x1 | x_t] in closed form as the
  head; the sampler's chunks must come out with the data's mean and variance."""
  mu, s, sigma = 1.5, 0.5, 1.0

  def exact_x1(x_t, t, h, prev=None, **_):
    t = t[:, None]
    gain = t * s**2 / (t**2 * s**2 + (1 - t)**2 * sigma**2)
    return mu + gain * (x_t - t * mu)

  stub = types.SimpleNamespace(
      cfg=types.SimpleNamespace(chunk_size=K, head=types.SimpleNamespace(
          kind='flow', input='tokens')),
      head=types.SimpleNamespace(x1=exact_x1, condition=lambda h: h),
      start_input=lambda B: jnp.zeros((B, 1, 1)),
      init_cache=lambda B, N: jnp.zeros(()),
      step=lambda inp, caches, n: (inp, caches),
      to_latent=lambda x: x,
      chunk_input=lambda tokens, x: jnp.zeros((tokens.shape[0], 1, 1)))
  x0 = sigma * jax.random.normal(jax.random.key(0), (4000, 3, 2))
  x, _ = samplers.head_sample(  # a traced step count: the sampler's fori_loop
      stub, lambda z, n: jnp.zeros(z.shape[:2] + (K,), jnp.int32), x0,
      jnp.asarray(100), jax.random.key(1))
  np.testing.assert_allclose(np.mean(x), mu, atol=0.02)
  np.testing.assert_allclose(np.var(x), s**2, rtol=0.05)


def test_energy_score_equals_its_formula_by_brute_force():
  rng = np.random.default_rng(0)
  samples, target = rng.normal(size=(4, 3, 5)), rng.normal(size=(3, 5))
  got = np.asarray(head_lib.energy_score(jnp.asarray(samples), jnp.asarray(target)))
  S = samples.shape[0]
  for m in range(3):
    to_y = sum(np.linalg.norm(samples[i, m] - target[m]) for i in range(S)) / S
    between = sum(np.linalg.norm(samples[i, m] - samples[j, m])
                  for i in range(S) for j in range(S) if i != j) / (S * (S - 1))
    np.testing.assert_allclose(got[m], to_y - 0.5 * between, rtol=1e-5)


@pytest.mark.parametrize('kind,predict', [('flow', 'x1'), ('flow', 'velocity'),
                                          ('energy', 'x1')])
def test_loss_learns_and_its_parts_are_reported(kind, predict):
  """A few optimizer steps lower the loss of a fixed batch; the metrics name each part."""
  import optax
  model = make(kind=kind, predict=predict, token_loss=0.5)
  tokens, x1 = data(B=4)
  cfg = flow.FlowConfig(noise_std=1.0)
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    (loss, m), grads = nnx.value_and_grad(
        lambda mdl: generator.loss_fn(mdl, tokens, x1, jax.random.key(0), cfg),
        has_aux=True)(model)
    opt.update(model, grads)
    return loss, m

  first, m = step(model, opt)
  for _ in range(15):
    last, _ = step(model, opt)
  assert float(last) < 0.8 * float(first)
  assert {'mse', 'next_chunk_ce', 'next_chunk_accuracy', 'loss'} <= set(m)
  assert ('energy' in m) == (kind == 'energy')


# ------------------------------------------------- a trained micro run of the generator


@pytest.fixture(scope='module')
def head_run(head_run_dir):
  import tokcom_jax
  return tokcom_jax.load(head_run_dir)


@pytest.mark.slow
def test_stage_two_with_reflow_trains_the_teacher_then_its_head_alone(head_run):
  import json
  import os

  import tokcom_jax
  from tokcom_jax.storage import checkpoint
  teacher_dir = os.path.join(head_run.workdir, 'teacher')
  teacher = tokcom_jax.load(teacher_dir)
  assert teacher.config.stage == 'diffusion' and teacher.config.sample.steps == 3
  assert head_run.config.stage == 'reflow'
  assert head_run.config.teacher_workdir == teacher_dir
  assert checkpoint.read_meta(teacher_dir)[0] == 8
  rows = [json.loads(l) for l in open(os.path.join(head_run.workdir, 'metrics.jsonl'))]
  assert max(r['step'] for r in rows) == 4
  assert any('train/reflow_mse' in r for r in rows)
  # The trunk and the chunk input are the teacher's, bit for bit; the head moved.
  flat = lambda params: dict(jax.tree_util.tree_leaves_with_path(params))
  ours, theirs = flat(head_run.dit_params), flat(teacher.dit_params)
  assert ours.keys() == theirs.keys()
  changed = [jax.tree_util.keystr(k) for k in ours
             if not np.array_equal(ours[k], theirs[k])]
  assert changed and all(k.startswith("['head']") for k in changed), changed
  # The run resumes: its optimizer state (moments for the head only) reads back.
  from tokcom_jax.training import trainer as trainer_lib
  assert trainer_lib.Trainer(head_run.config, head_run.workdir)._restore() == 4


@pytest.mark.slow
def test_a_prompt_ending_inside_a_chunk_is_kept_verbatim_and_continued(head_run):
  model = head_run
  ids = model._tokens('import os\nimport sys\n')
  assert len(ids) % model.chunk_size  # ends inside a chunk
  _, tokens = model.sample(3, steps=3, seed=1, prompt='import os\nimport sys\n')
  np.testing.assert_array_equal(tokens[:, :len(ids)], np.broadcast_to(ids, (3, len(ids))))
  texts = model.generate(3, steps=3, prompt='import os\nimport sys\n')
  assert all(t.startswith('import os\nimport sys\n') for t in texts)
  # The same seed gives the same text; another seed another.
  again = model.sample(3, steps=3, seed=1, prompt='import os\nimport sys\n')[1]
  np.testing.assert_array_equal(tokens, again)
  other = model.sample(3, steps=3, seed=2, prompt='import os\nimport sys\n')[1]
  assert not np.array_equal(tokens[:, len(ids):], other[:, len(ids):])


@pytest.mark.slow
def test_a_long_sample_counts_its_chunks_and_draws_the_same(head_run, monkeypatch):
  from tokcom_jax.inference import chunk_generation
  quick = head_run.sample(3, steps=3, seed=4, batch_size=2)
  monkeypatch.setattr(chunk_generation, 'LONG_SAMPLE', 1)  # every sample is long
  counted = head_run.sample(3, steps=3, seed=4, batch_size=2)
  assert chunk_generation._BAR[0].n == 2 * head_run.max_chunks  # 2 batches' chunks
  np.testing.assert_array_equal(counted[1], quick[1])
  np.testing.assert_allclose(counted[0], quick[0], atol=1e-6)


@pytest.mark.slow
def test_evaluation_measures_context_use_and_brier_beside_the_ar_stage(head_run, ar_run):
  from tokcom_jax.evaluation import brier, model_metrics
  from tokcom_jax.inference.loading import load
  model = head_run
  windows = np.asarray(jax.random.randint(jax.random.key(0), (4, 32), 0, 300))
  m = model_metrics.flow_metrics(model, windows, batch_size=4)
  assert {'val_mse_own_context', 'val_mse_other_context', 'val_next_chunk_accuracy'} <= set(m)
  assert set(m['val_ce']) == {'0.1', '0.5', '0.9'}
  ours = brier.tokcom_brier(model, windows, 4, 0, steps=2, noise_scale=1.0)
  theirs = brier.ar_brier(load(ar_run), windows, 4, 4, 0)
  for s in (ours, theirs):
    assert set(s) == {'brier_1', 'brier_2', 'brier_3', 'brier_4', 'brier_lm'}
    assert all(-1.0 <= s[f'brier_{n}'] <= 1.0 for n in (1, 2, 3, 4))
    assert 0.0 <= s['brier_lm'] <= 100.0


def test_reflow_times_are_those_of_samplers_of_1_to_max_steps():
  np.testing.assert_allclose(generator.reflow_times(4),
                             [0, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 3 / 4], rtol=1e-6)


def test_reflow_targets_the_teacher_s_steps_from_the_same_noise():
  """A student that is its teacher has nothing to learn when the teacher's target is
  its own one step from x0 (t = 0: the student's prediction is that step); with more
  teacher steps the targets move and it has."""
  teacher = make('latent', token_loss=0.0)
  tokens, x1 = data()
  loss = nnx.jit(lambda s, t, steps, max_steps: generator.reflow_loss(
      s, t, tokens, x1, jax.random.key(0), teacher_steps=steps, max_steps=max_steps,
      batch_mul=2, noise_std=0.35)[0], static_argnums=(2, 3))
  assert float(loss(teacher, teacher, 1, 1)) < 1e-10
  assert float(loss(teacher, teacher, 4, 1)) > 1e-3
  # The student learns from its head alone: no gradient reaches its trunk.
  grads = nnx.grad(lambda s: generator.reflow_loss(
      s, teacher, tokens, x1, jax.random.key(0), teacher_steps=4, max_steps=4,
      batch_mul=2, noise_std=0.35)[0])(make('latent', token_loss=0.0, seed=3))
  norm = lambda tree: sum(float(jnp.sum(jnp.square(g))) for g in jax.tree.leaves(tree))
  assert norm(grads['trunk']) == 0.0 and norm(grads['head']) > 0.0


def test_shortcut_loss_targets_two_half_steps_and_the_flow_at_the_finest_size():
  """A stub head whose x1 does not depend on x_t: x1 = 1 + d·e. Two of its steps of
  d land where one step toward their common x1 does, so the target is 1 + d'·e
  (d' = d, or 0 at the finest size 1/S, the flow's) and the student predicts
  1 + 2d·e: the loss is the mean of (2d - d')² over the sizes drawn."""
  S, M = 8, 30000
  calls = []

  def x1(x_t, t, c, projected=False, d_M=None):
    calls.append((np.asarray(t), np.asarray(d_M)))
    return jnp.ones_like(x_t) + d_M[:, None] * jnp.ones_like(x_t)

  stub = types.SimpleNamespace(cfg=types.SimpleNamespace(shortcut_from=S),
                               condition=lambda c: c, x1=x1)
  loss = head_lib.shortcut_loss(stub, jnp.zeros((M, 3)), jnp.zeros((M, 2)),
                                jax.random.key(0), 1.0)
  two_d = calls[2][1]  # the student's sizes: 1, 1/2, 1/4, each a third of rows
  np.testing.assert_allclose(sorted(set(two_d.tolist())), [0.25, 0.5, 1.0])
  np.testing.assert_allclose(calls[0][1], np.where(two_d == 2 / S, 0, two_d / 2))
  t = calls[0][0]
  assert np.all(t + two_d <= 1) and np.allclose(t / two_d, np.round(t / two_d))
  expected = np.mean(np.where(two_d == 2 / S, two_d, two_d / 2) ** 2)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(expected, (1 / 4 + 1 / 16 + 1 / 16) / 3, rtol=0.02)


def test_stage_two_with_reflow_is_a_teacher_run_then_a_reflow_run(caplog):
  import os

  from configs import tiny
  from tokcom_jax import stages
  (vae, vae_dir), (two, two_dir) = stages.phases(tiny.get_config('all'), 'r')
  assert (vae.stage, vae_dir, two.stage, two_dir) == (
      'vae', os.path.join('r', 'vae'), 'diffusion', os.path.join('r', 'diffusion'))
  assert two.vae_workdir == vae_dir
  (teacher, teacher_dir), (student, student_dir) = stages.phases(two, two_dir)
  assert teacher_dir == os.path.join(two_dir, 'teacher') and student_dir == two_dir
  assert teacher.stage == 'diffusion' and teacher.train.reflow.num_steps == 0
  assert teacher.sample.steps == teacher.reflow.teacher_steps == 16
  assert student.stage == 'reflow' and student.teacher_workdir == teacher_dir
  assert student.sample.steps == 1 and student.train.reflow.num_steps == 600
  # No flow head to reflow: one run, and a warning says so.
  chunkwise = tiny.get_config('diffusion,flow.order=chunkwise')
  with caplog.at_level('WARNING'):
    assert stages.phases(chunkwise, 'w') == [(chunkwise, 'w')]
  assert 'no flow head to reflow' in caplog.text
