"""Layers under one lax.scan: the same numbers as the Python loop (forward, gradients,
KV-cache decoding), remat that saves less, a program that does not grow with depth,
and shardings and weight layouts that follow the stacked axis."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from tokcom_jax import config_lib
from tokcom_jax.models import dit, stacks, layers, lm
from tokcom_jax.storage import checkpoint
from tokcom_jax.training import sharding, train_state

D, T, B = 32, 6, 2


def stack_cfg(**kw) -> layers.TransformerConfig:
  base = dict(hidden_size=D, num_layers=3, num_heads=4, num_kv_heads=2,
              intermediate_size=64, rope_theta=10_000.0, causal=True)
  base.update(kw)
  return layers.TransformerConfig(**base)


def drawn(abstract, seed=0, std=0.3):
  """Every parameter from N(base, std²), base 1 for norm scales: no zero gates or
  biases, so a misplaced layer changes the output."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    base = 1.0 if any(getattr(k, 'key', None) == 'scale' for k in path) else 0.0
    return jnp.asarray(base + std * rng.standard_normal(x.shape), jnp.float32)
  return jax.tree.map_with_path(draw, abstract)


def loop_and_scan(build):
  """(loop graphdef, loop params, scanned graphdef, the same params stacked)."""
  loop_g, abstract = nnx.split(nnx.eval_shape(lambda: build(False)))
  scan_g, _ = nnx.split(nnx.eval_shape(lambda: build(True)))
  params = nnx.to_pure_dict(drawn(abstract))
  return loop_g, params, scan_g, stacks.stack_layers(params)


def merged(graphdef, pure):
  return nnx.merge(graphdef, pure)


@pytest.mark.parametrize('remat', stacks.REMAT_POLICIES)
def test_a_scanned_stack_computes_what_the_loop_computes(remat):
  build = lambda scan: layers.Transformer(stack_cfg(scan_layers=scan, remat=remat),
                                          rngs=nnx.Rngs(0))
  loop_g, params, scan_g, stacked = loop_and_scan(build)
  x_BTD = jax.random.normal(jax.random.key(1), (B, T, D))

  def loss(graphdef, p):
    return jnp.sum(jnp.sin(merged(graphdef, p)(x_BTD)))
  loop_v, loop_grad = jax.value_and_grad(functools.partial(loss, loop_g))(params)
  scan_v, scan_grad = jax.jit(jax.value_and_grad(functools.partial(loss, scan_g)))(
      stacked)
  np.testing.assert_allclose(scan_v, loop_v, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(loop_grad),
                          jax.tree.leaves(stacks.unstack_layers(scan_grad))):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def test_stack_and_unstack_are_inverse_and_keep_layer_order():
  build = lambda scan: layers.Transformer(stack_cfg(scan_layers=scan), rngs=nnx.Rngs(0))
  _, params, scan_g, stacked = loop_and_scan(build)
  kernel = stacked['blocks']['mlp']['down']['kernel']
  assert kernel.shape == (3, 64, D)
  np.testing.assert_array_equal(kernel[2], params['blocks'][2]['mlp']['down']['kernel'])
  back = stacks.unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  # The stacked dict is exactly the scanned model's parameter tree.
  abstract = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: build(True)))[1])
  assert jax.tree.map(jnp.shape, abstract) == jax.tree.map(jnp.shape, stacked)


def test_remat_keeps_fewer_activations_for_the_backward_pass():
  x_BTD = jax.random.normal(jax.random.key(1), (B, T, D))

  def saved(remat):
    model = layers.Transformer(stack_cfg(scan_layers=True, remat=remat),
                               rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    f = lambda p: jnp.sum(nnx.merge(graphdef, p)(x_BTD))
    _, backward = jax.vjp(f, params)  # a Partial whose leaves are the residuals
    return sum(x.size for x in jax.tree.leaves(backward))
  none, dots, full = saved('none'), saved('dots_saveable'), saved('full')
  assert full < dots < none, (full, dots, none)


def count_dots(num_layers: int, scan: bool) -> int:
  cfg = stack_cfg(num_layers=num_layers, scan_layers=scan)
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: layers.Transformer(cfg, rngs=nnx.Rngs(0))))
  f = lambda p, x: nnx.merge(graphdef, p)(x)
  text = jax.jit(jax.grad(lambda p, x: jnp.sum(f(p, x)))).lower(
      abstract, jax.ShapeDtypeStruct((B, T, D), jnp.float32)).as_text()
  return text.count('dot_general')


def test_the_scanned_program_does_not_grow_with_depth():
  assert count_dots(2, True) == count_dots(8, True) > 0
  assert count_dots(8, False) > 3 * count_dots(2, False)


def lm_cfg(scan: bool) -> lm.LMConfig:
  return lm.LMConfig(vocab_size=64, hidden_size=D, num_layers=3, num_heads=4,
                     num_kv_heads=2, intermediate_size=64, rope_theta=10_000.0,
                     scan_layers=scan)


def test_a_scanned_lm_decodes_with_a_stacked_cache_like_the_loop():
  build = lambda scan: lm.CausalLM(lm_cfg(scan), rngs=nnx.Rngs(0))
  loop_g, params, scan_g, stacked = loop_and_scan(build)
  model = merged(scan_g, stacked)
  cache = model.init_cache(B, 12)
  assert cache['k'].shape == (3, B, 12, 2, D // 4)
  buffer_BS = jax.random.randint(jax.random.key(3), (B, 12), 0, 64, jnp.int32)
  key = jax.random.key(4)
  sample = lambda g, p: lm.generate(g, nnx.state(merged(g, p)), buffer_BS, 4, key,
                                    temperature=1.0, top_k=8)
  scanned, looped = sample(scan_g, stacked), sample(loop_g, params)
  np.testing.assert_array_equal(scanned, looped)
  assert not np.array_equal(np.asarray(scanned[:, 4:]), np.asarray(buffer_BS[:, 4:]))


@pytest.mark.parametrize('causal', [False, True])
def test_a_scanned_flow_model_predicts_what_the_loop_predicts(causal):
  cfg = lambda scan: dit.DiTConfig(
      latent_dim=8, hidden_size=D, num_layers=3, num_heads=4, num_kv_heads=2,
      intermediate_size=64, self_condition=True, causal=causal, scan_layers=scan)
  build = lambda scan: dit.LatentFlowTransformer(cfg(scan), rngs=nnx.Rngs(0))
  loop_g, params, scan_g, stacked = loop_and_scan(build)
  x_BNZ, prev_BNZ, clean_BNZ = jax.random.normal(jax.random.key(5), (3, B, 5, 8))
  t = jax.random.uniform(jax.random.key(6), (B, 5) if causal else (B,))
  out = lambda g, p: merged(g, p)(x_BNZ, t, prev_BNZ, clean_BNZ if causal else None)
  np.testing.assert_allclose(out(scan_g, stacked), out(loop_g, params),
                             rtol=1e-4, atol=1e-4)
  # What the samplers run: the scanned model as a loop, weights sliced once.
  looped = stacks.as_loop(merged(scan_g, stacked))
  assert isinstance(looped.blocks, nnx.List) and len(looped.blocks) == 3
  np.testing.assert_array_equal(looped.blocks[1].mlp.up.kernel[...],
                                stacked['blocks']['mlp']['up']['kernel'][1])
  np.testing.assert_allclose(
      looped(x_BNZ, t, prev_BNZ, clean_BNZ if causal else None), out(loop_g, params),
      rtol=1e-4, atol=1e-4)


def test_the_stacked_axis_is_replicated_and_the_width_still_sharded():
  model = nnx.eval_shape(lambda: layers.Transformer(stack_cfg(scan_layers=True),
                                                    rngs=nnx.Rngs(0)))
  with nnx.logical_axis_rules(sharding.LOGICAL_RULES):
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model)))
  assert tuple(specs['blocks']['attn']['query']['kernel']) == (
      None, 'fsdp', None, None)
  assert tuple(specs['blocks']['mlp']['down']['kernel']) == (None, None, 'fsdp')
  assert tuple(specs['final_norm']['scale']) == ('fsdp',)


def test_scan_is_the_default_and_a_run_saved_before_it_loads_as_a_loop():
  assert tiny.get_config('vae').scan_layers is False  # shallow: a loop is faster
  config = config_lib.base_config()
  assert config.scan_layers is True and config.remat == 'none'
  saved = config.to_dict()
  assert config_lib.from_dict(saved).scan_layers is True
  del saved['scan_layers']
  assert config_lib.from_dict(saved).scan_layers is False
  assert dataclasses.replace(stack_cfg(), remat='full').remat == 'full'
  with pytest.raises(ValueError, match='remat'):
    stack_cfg(remat='some')


@pytest.mark.parametrize('saved_scanned', [False, True])
def test_a_checkpoint_restores_into_the_other_layout(tmp_path, saved_scanned):
  """A run saved with one `scan_layers` (e.g. before scan was the default) loads into
  a model built with the other: same numbers, the target's shapes and shardings."""
  build = lambda scan: layers.Transformer(stack_cfg(scan_layers=scan), rngs=nnx.Rngs(0))
  loop_g, params, scan_g, stacked = loop_and_scan(build)
  mngr = checkpoint.manager(tmp_path)
  checkpoint.save(mngr, 1, {'params': stacked if saved_scanned else params}, {},
                  force=True)
  mngr.wait_until_finished()
  mngr.close()
  mesh = sharding.make_mesh(1, 1)
  target = train_state.abstract_params(lambda r: build(not saved_scanned), mesh)[1]
  restored, _, step = checkpoint.restore_params(tmp_path, target)
  expected = params if saved_scanned else stacked
  assert step == 1
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for a, b, t in zip(jax.tree.leaves(restored), jax.tree.leaves(expected),
                     jax.tree.leaves(target)):
    np.testing.assert_array_equal(a, b)
    assert a.sharding == t.sharding
