import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokcom_jax import flow


def test_interpolate_endpoints_and_midpoint():
  x0 = jnp.full((2, 3, 4), 2.0)
  x1 = jnp.full((2, 3, 4), 6.0)
  out = flow.interpolate(x0, x1, jnp.array([0.0, 0.25]))
  np.testing.assert_array_equal(out[0], x0[0])
  np.testing.assert_allclose(out[1], 3.0)


def test_t_schedules():
  u = flow.sample_t(jax.random.key(0), 20000)
  assert 0 <= float(u.min()) and float(u.max()) <= 1
  np.testing.assert_allclose(u.mean(), 0.5, atol=0.01)
  ln = flow.sample_t(jax.random.key(0), 20000, 'logit_normal', mean=1.0, std=0.5)
  np.testing.assert_allclose(jnp.median(jnp.log(ln / (1 - ln))), 1.0, atol=0.02)
  noise = flow.sample_noise(jax.random.key(1), (100, 100), 0.05)
  np.testing.assert_allclose(noise.std(), 0.05, rtol=0.02)
  with pytest.raises(ValueError, match='unknown t schedule'):
    flow.sample_t(jax.random.key(0), 2, 'cosine')


def test_loss_reports_ce_and_mse_separately():
  x1 = jnp.ones((1, 2, 3))
  pred = jnp.zeros((1, 2, 3))
  tokens = jnp.array([[0, 1, 1, 0]])
  decode = lambda z: jax.nn.one_hot(jnp.zeros((1, 4), jnp.int32), 2) * 0.0
  loss, m = flow.loss_fn(pred, x1, tokens, jnp.ones_like(tokens), decode,
                         ce_weight=2.0, mse_weight=3.0)
  np.testing.assert_allclose(m['ce'], np.log(2), rtol=1e-6)  # uniform over 2 classes
  np.testing.assert_allclose(m['mse'], 1.0)
  np.testing.assert_allclose(loss, 2 * np.log(2) + 3.0, rtol=1e-6)


@pytest.mark.parametrize('steps', [1, 2, 50])
def test_euler_sampler_with_oracle_lands_exactly_on_x1(steps):
  x1 = jax.random.normal(jax.random.key(0), (2, 5, 3))
  x0 = 0.05 * jax.random.normal(jax.random.key(1), (2, 5, 3))
  out = jax.jit(lambda x0, s: flow.euler_sample(lambda x_t, t: x1, x0, s))(x0, steps)
  np.testing.assert_array_equal(out, x1)


def test_euler_sampler_follows_the_straight_path():
  # With a constant prediction c, after k of n steps x = (1 - k/n)·x0 + (k/n)·c.
  x0, c = jnp.zeros((1, 1, 1)), jnp.ones((1, 1, 1))
  out = flow.euler_sample(lambda x, t: c, x0, 4)
  np.testing.assert_allclose(out, 1.0)
  half = flow.euler_sample(lambda x, t: jnp.where(t[:, None, None] < 0.5, c, x), x0, 4)
  np.testing.assert_allclose(half, 0.5, rtol=1e-6)  # stops moving at t = 0.5


def test_one_compile_serves_any_number_of_steps():
  traces = []
  def oracle(x_t, t):
    return jnp.ones_like(x_t)
  @jax.jit
  def sample(x0, steps):
    traces.append(None)
    return flow.euler_sample(oracle, x0, steps)
  x0 = jnp.zeros((2, 4, 3))
  for steps in (1, 7, 50):
    np.testing.assert_array_equal(sample(x0, steps), 1.0)
  assert len(traces) == 1


@pytest.mark.parametrize('steps', [1, 2, 50])
def test_known_latents_end_exactly_at_their_values(steps):
  x0 = 0.05 * jax.random.normal(jax.random.key(1), (2, 6, 3))
  known = jax.random.normal(jax.random.key(2), (2, 6, 3))
  mask = jnp.array([[True, True, False, False, False, False]] * 2)
  model_guess = jax.random.normal(jax.random.key(3), (2, 6, 3))
  out = flow.euler_sample(lambda x_t, t: model_guess, x0, steps, known_mask_BN=mask, known_BNZ=known)
  np.testing.assert_array_equal(out[:, :2], known[:, :2])
  np.testing.assert_array_equal(out[:, 2:], model_guess[:, 2:])


def test_known_latents_ride_their_interpolation_path():
  x0 = jnp.zeros((1, 2, 1))
  known = jnp.full((1, 2, 1), 4.0)
  mask = jnp.array([[True, False]])
  inputs = []
  def model(x_t, t):
    inputs.append(x_t)
    return jnp.zeros_like(x_t)
  with jax.disable_jit():
    flow.euler_sample(model, x0, 4, known_mask_BN=mask, known_BNZ=known)
  held = [float(x[0, 0, 0]) for x in inputs]
  assert held == [0.0, 1.0, 2.0, 3.0]  # (1-t)·0 + t·4 at t = 0, 1/4, 2/4, 3/4
