"""Our layers against Hugging Face Qwen2, the model they copy.

The reference outputs come from benchmarks/make_qwen2_reference.py (PyTorch, run by
hand); this file needs only JAX. Every weight is random and copied into our modules,
so a dropped bias, a wrong eps, RoPE convention or GQA grouping changes the outputs.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tokcom_jax.models import layers


REFERENCE = os.path.join(os.path.dirname(__file__), 'data', 'qwen2_reference.npz')
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope='module')
def ref():
  with np.load(REFERENCE, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def config(ref, causal: bool) -> layers.TransformerConfig:
  """The reference's shapes; theta and eps are given, never our defaults."""
  return layers.TransformerConfig(
      hidden_size=int(ref['config.hidden_size']),
      num_layers=int(ref['config.num_layers']),
      num_heads=int(ref['config.num_heads']),
      num_kv_heads=int(ref['config.num_kv_heads']),
      intermediate_size=int(ref['config.intermediate_size']),
      rope_theta=float(ref['config.rope_theta']),
      rms_eps=float(ref['config.rms_eps']),
      causal=causal)


def build(make, ref, case: str) -> nnx.Module:
  """`make(rngs)` built abstractly, then every nnx.Param set from `<case>.params.`.

  Abstract (nnx.eval_shape) because the random init would be thrown away: on CPU
  its eager compiles cost seconds. Each parameter must be given, so none is left
  abstract, and each reference weight must land somewhere.
  """
  module = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
  prefix = f'{case}.params.'
  given = {k[len(prefix):] for k in ref if k.startswith(prefix)}
  found = set()
  for path, var in nnx.iter_graph(module):
    if not isinstance(var, nnx.Param):
      continue
    key = '.'.join(map(str, path))
    assert key in given, f'{prefix}{key} is missing from the reference'
    assert var.get_value().shape == ref[prefix + key].shape, key
    var.set_value(jnp.asarray(ref[prefix + key]))
    found.add(key)
  assert found == given, f'reference weights with no parameter: {given - found}'
  return module


def x_and_positions(ref):
  x_BTD = jnp.asarray(ref['inputs.x'])
  return x_BTD, jnp.arange(x_BTD.shape[1])


@pytest.mark.parametrize('inputs,output', [
    ('inputs.x', 'rms_norm.out'),
    ('inputs.x_small', 'rms_norm.out_small'),  # mean square ~ eps: eps shows
])
def test_rms_norm(ref, inputs, output):
  cfg = config(ref, causal=False)
  norm = build(lambda rngs: layers.rms_norm(cfg.hidden_size, cfg, rngs=rngs), ref,
               'rms_norm')
  np.testing.assert_allclose(norm(jnp.asarray(ref[inputs])), ref[output], **TOL)


def test_swiglu(ref):
  cfg = config(ref, causal=False)
  mlp = build(lambda rngs: layers.SwiGLU(cfg, rngs=rngs), ref, 'mlp')
  np.testing.assert_allclose(mlp(jnp.asarray(ref['inputs.x'])), ref['mlp.out'], **TOL)


@pytest.mark.parametrize('causal,output', [
    (True, 'attention.out_causal'),
    (False, 'attention.out_bidirectional'),
])
def test_attention(ref, causal, output):
  cfg = config(ref, causal=causal)
  attn = build(lambda rngs: layers.Attention(cfg, rngs=rngs), ref, 'attention')
  np.testing.assert_allclose(attn(*x_and_positions(ref)), ref[output], **TOL)


def test_block(ref):
  cfg = config(ref, causal=True)
  block = build(lambda rngs: layers.Block(cfg, rngs=rngs), ref, 'block')
  np.testing.assert_allclose(block(*x_and_positions(ref)), ref['block.out'], **TOL)


def test_transformer(ref):
  cfg = config(ref, causal=True)
  model = build(lambda rngs: layers.Transformer(cfg, rngs=rngs), ref, 'transformer')
  np.testing.assert_allclose(
      model(jnp.asarray(ref['inputs.x'])), ref['transformer.out'], **TOL)
