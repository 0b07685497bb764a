"""Where the rows of a batch and the widths of parameters land on a mesh.

Training reads `process_rows` of every global batch and hands them to
`global_batch`; a wrong slice or placement would train on the wrong rows without an
error. A device count is fixed when JAX starts, so the 8-device checks run in one
fresh subprocess that prints JSON, and this process asserts on it.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from tokcom_jax.errors import ConfigError
from tokcom_jax.training import sharding


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh interpreter with 8 CPU devices. For each mesh (data × fsdp) it
# reports process_rows, every addressable shard (its device's position in the mesh,
# its row slice, whether its data equals those rows of the source) and the fsdp
# axis each small parameter got; then whether check_batch accepts 16 and 12.
SCRIPT = r'''
import json
import jax
import numpy as np
from flax import nnx
from tokcom_jax.errors import ConfigError
from tokcom_jax.models import axes, layers
from tokcom_jax.training import sharding


class Small(nnx.Module):
  def __init__(self, rngs):
    self.w12 = layers.dense(12, 6, ('embed', 'mlp'), dtype=np.float32, rngs=rngs)
    self.w10 = layers.dense(10, 6, ('embed', 'mlp'), dtype=np.float32, rngs=rngs)
    self.down = layers.dense(6, 12, ('mlp', 'embed'), dtype=np.float32,
                             use_bias=True, rngs=rngs)
    self.norm = nnx.RMSNorm(12, scale_init=axes.partitioned(layers.ones_init,
                                                              'embed'), rngs=rngs)


out = {'devices': jax.device_count(), 'meshes': {}}
source = np.arange(16 * 3).reshape(16, 3)
for data, fsdp in ((4, 2), (2, 4)):
  mesh = sharding.make_mesh(data, fsdp)
  rows = sharding.process_rows(16, mesh)
  batch = sharding.global_batch(source[rows], mesh, 16)
  order = [d.id for d in mesh.devices.flat]  # mesh order: data-major
  shards = sorted(
      [order.index(s.device.id), s.index[0].start, s.index[0].stop,
       s.index[1] == slice(None), bool((np.asarray(s.data) == source[s.index]).all())]
      for s in batch.addressable_shards)
  abstract = nnx.state(nnx.eval_shape(lambda: Small(nnx.Rngs(0))))
  specs = jax.tree.map(lambda s: list(s.spec), nnx.to_pure_dict(
      sharding.param_shardings(abstract, mesh)))
  out['meshes'][f'{data}x{fsdp}'] = {
      'rows': [rows.start, rows.stop, rows.step], 'shape': list(batch.shape),
      'equal': bool((np.asarray(batch) == source).all()), 'shards': shards,
      'specs': specs}
mesh = sharding.make_mesh(4, 2)
sharding.check_batch(16, mesh)
try:
  sharding.check_batch(12, mesh)
  out['check_12'] = 'accepted'
except ConfigError as e:
  out['check_12'] = str(e)
print('JSON' + json.dumps(out))
'''


@pytest.fixture(scope='module')
def eight_devices():
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='8',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  done = subprocess.run([sys.executable, '-c', SCRIPT], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  line = [l for l in done.stdout.splitlines() if l.startswith('JSON')][-1]
  out = json.loads(line[4:])
  assert out['devices'] == 8
  return out


@pytest.mark.slow
@pytest.mark.parametrize('mesh', ['4x2', '2x4'])
def test_one_process_owns_every_row(eight_devices, mesh):
  """A single process addresses all 8 devices, so it loads all 16 rows."""
  m = eight_devices['meshes'][mesh]
  assert m['rows'] == [0, 16, None]
  assert m['shape'] == [16, 3] and m['equal']


@pytest.mark.slow
@pytest.mark.parametrize('mesh', ['4x2', '2x4'])
def test_batch_rows_follow_mesh_order(eight_devices, mesh):
  """Rows are split over (data, fsdp) together, data-major: the i-th device in mesh
  order holds rows 2i, 2i+1 (16 rows / 8 devices) of the batch, all columns, and
  exactly those rows of the source."""
  shards = eight_devices['meshes'][mesh]['shards']
  assert shards == [[i, 2 * i, 2 * i + 2, True, True] for i in range(8)]


@pytest.mark.slow
def test_embed_goes_to_fsdp_only_where_it_divides(eight_devices):
  """`embed` → fsdp, every other logical axis replicated; a width the fsdp size does
  not divide (10 on fsdp 4) stays replicated instead of failing (`_fit`)."""
  fsdp2, fsdp4 = (eight_devices['meshes'][m]['specs'] for m in ('4x2', '2x4'))
  assert fsdp2['w12'] == {'kernel': ['fsdp', None]}
  assert fsdp2['w10'] == {'kernel': ['fsdp', None]}  # 10 % 2 == 0
  assert fsdp4['w12'] == {'kernel': ['fsdp', None]}
  assert fsdp4['w10'] == {'kernel': [None, None]}  # 10 % 4 != 0: replicated
  for specs in (fsdp2, fsdp4):
    assert specs['down'] == {'kernel': [None, 'fsdp'], 'bias': ['fsdp']}
    assert specs['norm'] == {'scale': ['fsdp']}


@pytest.mark.slow
def test_check_batch_names_the_device_count(eight_devices):
  """16 rows split over 8 devices; 12 do not, and the error says what to set."""
  assert 'batch_size 12 is not divisible by the 8 devices' in eight_devices['check_12']
  assert 'multiple of 8' in eight_devices['check_12']


def test_process_rows_on_one_device():
  """In-process (one CPU device unless the environment fakes more): the single
  process loads every row, and a mesh that does not use the devices is an error."""
  mesh = sharding.make_mesh(-1, 1)
  n = jax.device_count()
  assert dict(mesh.shape) == {'data': n, 'fsdp': 1}
  assert sharding.process_rows(8, mesh) == slice(0, 8)
  with pytest.raises(ConfigError, match=f'mesh {n + 1}x1 .* the {n} devices'):
    sharding.make_mesh(n + 1, 1)


@pytest.mark.parametrize('modifiers, backend, named', [
    ('', 'cpu', ['compute_dtype=bfloat16']),  # v5.2 computes in bfloat16
    ('compute_dtype=float32,mesh.fsdp=4', 'cpu', ['mesh.fsdp=4']),
    ('', 'gpu', None),
    ('compute_dtype=float32', 'cpu', None),
])
def test_a_config_for_an_accelerator_on_the_cpu_gets_one_line(modifiers, backend, named):
  from configs import v52
  config = v52.get_config(','.join(p for p in ('vae', modifiers) if p))
  warning = sharding.cpu_only_warning(config, backend)
  if named is None:
    assert warning is None
  else:
    assert '\n' not in warning and all(n in warning for n in named), warning
    assert 'pip install -e .[cuda12]' in warning
