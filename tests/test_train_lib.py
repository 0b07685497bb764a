import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import train_fixtures
from tokcom_jax.errors import CheckpointError, DataError, TrainingError
from tokcom_jax.storage import checkpoint
from tokcom_jax.training import trainer as trainer_lib


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def losses(workdir, key='train/loss'):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: r[key] for r in rows if key in r}


def test_vae_run_writes_metrics_config_tokenizer_and_checkpoints(vae_run):
  l = losses(vae_run)
  assert sorted(l) == list(range(1, 9)) and l[8] < l[1]
  evals = losses(vae_run, 'eval/loss')
  assert sorted(evals) == [4, 8]
  assert json.load(open(os.path.join(vae_run, 'config.json')))['stage'] == 'vae'
  assert os.path.exists(os.path.join(vae_run, 'tokenizer', 'tokenizer.json'))
  mngr = checkpoint.manager(vae_run, read_only=True)
  assert mngr.all_steps() == [4, 8]
  assert checkpoint.best_step(mngr) == min(evals, key=evals.get)


def test_vae_samples_are_reconstructions_of_validation_windows(corpus, vae_run):
  import tokcom_jax
  rows = [json.loads(l) for l in open(os.path.join(vae_run, 'samples.jsonl'))]
  assert [r['step'] for r in rows] == [8, 8]  # the last step: less than an epoch
  config = train_fixtures.micro_config(*corpus)
  windows = trainer_lib.Trainer(config, vae_run).val_windows.get(np.arange(2))
  model = tokcom_jax.load(vae_run)  # the saved checkpoint, through the sampling API
  model.vae_params, _, _ = checkpoint.restore_params(  # step 8, not the best step
      vae_run, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding),
                            model.vae_params), step=8)
  assert [r['input'] for r in rows] == [model.tokenizer.decode(w) for w in windows]
  out = np.asarray(model._decode(
      model.vae_params, model._encode(model.vae_params, jnp.asarray(windows)),
      jax.random.key(0), 0.0, 0, 1.0))
  accuracy = np.mean(out == windows, axis=1)
  assert accuracy.max() < 1.0  # 8 steps: hardly learnt
  assert [r['token_accuracy'] for r in rows] == pytest.approx(list(accuracy))
  assert [r['reconstruction'] for r in rows] == [model.tokenizer.decode(o)
                                                 for o in out]


def test_resumed_run_reproduces_the_uninterrupted_losses_exactly(corpus, vae_run,
                                                                 tmp_path):
  config = train_fixtures.micro_config(*corpus)
  workdir = str(tmp_path / 'vae')
  trainer_lib.Trainer(config, workdir).run(stop_after=3)
  assert sorted(losses(workdir)) == [1, 2, 3]
  trainer_lib.Trainer(config, workdir).run()  # a new process would do just this
  assert losses(workdir) == losses(vae_run)  # bit-identical floats
  assert losses(workdir, 'eval/loss') == losses(vae_run, 'eval/loss')


def test_a_run_of_the_same_shapes_reuses_the_traced_steps(corpus, tmp_path):
  """Runs that differ only in where they live or how often they log, evaluate, sample
  and save share their jitted steps; a field a step reads (the learning rate) does
  not."""
  make = lambda name, **fields: trainer_lib.Trainer(
      train_fixtures.micro_config(*corpus, **fields), str(tmp_path / name))
  first = make('a')
  again = make('b', log_every=2, eval_every=2, sample_every=0, keep_checkpoints=1)
  other = make('c', **{'train.vae.lr': 5e-3})
  assert (again.train_step, again.eval_step, again.sample_step) == (
      first.train_step, first.eval_step, first.sample_step)
  assert other.train_step is not first.train_step


def test_stage2_trains_and_leaves_the_vae_bit_identical(corpus, vae_run, tmp_path):
  config = train_fixtures.micro_config(*corpus, stage='diffusion',
                                       vae_workdir=vae_run, sample_every=1)
  trainer = trainer_lib.Trainer(config, str(tmp_path / 'diffusion'))
  before = jax.tree.map(np.asarray, trainer.frozen['vae'])
  trainer.run()
  on_disk, _, _ = checkpoint.restore_params(
      vae_run, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding),
                            trainer.frozen['vae']))
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray,
                                                                   trainer.frozen['vae']))
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, on_disk))
  l = losses(tmp_path / 'diffusion')
  assert sorted(l) == list(range(1, 9))
  ev = losses(tmp_path / 'diffusion', 'eval/ce_t0.5')
  assert sorted(ev) == [4, 8]
  samples = [json.loads(l) for l in open(tmp_path / 'diffusion' / 'samples.jsonl')]
  assert [s['step'] for s in samples] == [8, 8]
  # The same generations through the sampling API, from the step-8 checkpoint.
  import tokcom_jax
  from tokcom_jax.models import flow
  model = tokcom_jax.load(str(tmp_path / 'diffusion'))
  model.dit_params, _, _ = checkpoint.restore_params(
      tmp_path / 'diffusion', jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
          model.dit_params), step=8)
  x0 = flow.sample_noise(jax.random.fold_in(jax.random.key(config.seed + 2), 8),
                         (2, 8, 8), config.flow.noise_std)
  z = model._sample_latents(model.dit_params, x0, config.sample.steps,
                            jnp.zeros((2, 8), bool), jnp.zeros((2, 8, 8)))
  tokens = model.decode_tokens(z)
  assert [s['generation'] for s in samples] == [model.tokenizer.decode(t.tolist())
                                                for t in tokens]


def test_stage2_without_a_vae_names_the_missing_workdir(corpus, tmp_path):
  config = train_fixtures.micro_config(*corpus, stage='diffusion',
                                       vae_workdir=str(tmp_path / 'nowhere'))
  with pytest.raises(TrainingError, match='nowhere'):
    trainer_lib.Trainer(config, str(tmp_path / 'diffusion'))


def test_nan_guard_names_the_step(corpus, vae_run, tmp_path):
  config = train_fixtures.micro_config(*corpus, max_nan_steps=2)
  trainer = trainer_lib.Trainer(config, str(tmp_path / 'vae'))
  kernel = trainer.state['params']['lm_head']['kernel']
  trainer.state['params']['lm_head']['kernel'] = jnp.full_like(kernel, jnp.nan)
  with pytest.raises(TrainingError, match='2 steps in a row, at step 2:'):
    trainer.run()
  assert checkpoint.manager(tmp_path / 'vae', read_only=True).all_steps() == []


def poison(trainer, steps):
  """Training batches of `steps` (1-based) get token ids past the vocabulary: the
  embedding lookup of such an id is NaN, and so are the loss and the gradients."""
  calls = iter(range(1, 10**6))
  original = trainer._batch

  def batch(windows, indices):
    tokens = original(windows, indices)
    if windows is trainer.train_windows and next(calls) in steps:
      return tokens + 10**6
    return tokens
  trainer._batch = batch


def adam_count(state) -> int:
  counts = [int(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(
      state['opt_state']) if jax.tree_util.keystr(path).endswith('.count')]
  return counts[0]


def test_nan_gradients_are_skipped_and_counted(corpus, tmp_path):
  config = train_fixtures.micro_config(*corpus, max_nan_steps=3)
  trainer = trainer_lib.Trainer(config, str(tmp_path / 'vae'))
  poison(trainer, {3, 4})
  trainer.run()
  rows = {r['step']: r for r in map(json.loads, open(tmp_path / 'vae' /
                                                     'metrics.jsonl'))
          if 'train/skipped_steps' in r}
  assert [s for s, r in rows.items() if r['train/skipped_steps']] == [3, 4]
  assert 'train/loss' not in rows[3] and np.isfinite(rows[8]['train/loss'])
  assert rows[2]['train/nonfinite_total'] == 0 and rows[8]['train/nonfinite_total'] == 2
  assert adam_count(trainer.state) == 6  # 8 steps, 2 without an update
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(trainer.state['params']))


def test_nan_gradients_in_a_row_stop_the_run_and_the_last_checkpoint_restores(
    corpus, tmp_path):
  config = train_fixtures.micro_config(*corpus, max_nan_steps=3)
  trainer = trainer_lib.Trainer(config, str(tmp_path / 'vae'))
  poison(trainer, set(range(3, 100)))
  with pytest.raises(TrainingError, match='3 steps in a row, at step 5:'):
    trainer.run()
  resumed = trainer_lib.Trainer(config, str(tmp_path / 'vae'))
  assert resumed._restore() == 4  # saved by the eval at step 4, updates skipped
  assert adam_count(resumed.state) == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(resumed.state['params']))


def test_corpus_smaller_than_a_batch_is_a_clear_error(corpus, tmp_path):
  config = train_fixtures.micro_config(*corpus, batch_size=1_000_000)
  with pytest.raises(DataError, match='fewer than one batch'):
    trainer_lib.Trainer(config, str(tmp_path / 'vae'))


def _damage(path, how):
  if how == 'truncate':
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 2])
  elif how == 'delete':
    os.remove(path)
  else:  # one flipped bit: orbax reads it without complaint
    data = bytearray(open(path, 'rb').read())
    data[len(data) // 2] ^= 0x10
    open(path, 'wb').write(bytes(data))


@pytest.mark.parametrize('how', ['truncate', 'delete', 'flip'])
def test_damaged_checkpoint_falls_back_to_the_previous_one(corpus, vae_run, tmp_path,
                                                           how, caplog):
  import glob
  import shutil
  workdir = tmp_path / 'vae'
  config = train_fixtures.micro_config(*corpus)
  trainer_lib.Trainer(config, str(workdir)).run(stop_after=6)  # checkpoints 4 and 6
  files = glob.glob(str(workdir / 'checkpoints' / '6' / 'state' / '**' / 'd' / '*'),
                    recursive=True)
  _damage(max(files, key=os.path.getsize), how)
  with caplog.at_level('WARNING'):
    trainer = trainer_lib.Trainer(config, str(workdir))
    trainer.run()
  assert 'checkpoint step 6' in caplog.text and 'damaged' in caplog.text
  assert os.path.isdir(workdir / 'damaged_checkpoints' / '6')
  # Resumed from step 4: the same losses as the uninterrupted run, bit for bit.
  assert losses(workdir) == losses(vae_run)
  shutil.rmtree(workdir / 'checkpoints')
  shutil.copytree(workdir / 'damaged_checkpoints', workdir / 'checkpoints')
  with pytest.raises(CheckpointError, match='no checkpoint in .* can be'):
    trainer_lib.Trainer(config, str(workdir)).run()  # none readable: nothing moved
  assert os.listdir(workdir / 'checkpoints') == ['6']


@pytest.mark.slow  # stage 2 trained in process, then sampled
def test_stage2_recipe_standardizes_with_measured_statistics(corpus, vae_run, tmp_path):
  """The flow model's latent statistics are the per-dimension mean and std of the
  frozen encoder's latents on the first training batches, kept in its checkpoint;
  sampling maps its output back through them."""
  import tokcom_jax
  from tokcom_jax.data import batches
  from tokcom_jax.stages.flow import STATS_BATCHES
  recipe = dict(standardize=True, noise_std=1.0, self_condition=True, t_shift=3.0,
                ce_weight=0.1, ce_min_t=0.5)
  config = train_fixtures.micro_config(*corpus, stage='diffusion',
                                       vae_workdir=vae_run, **recipe)
  workdir = str(tmp_path / 'diffusion')
  trainer = trainer_lib.Trainer(config, workdir)
  trainer.run()
  assert sorted(losses(workdir)) == list(range(1, 9))
  model = tokcom_jax.load(workdir)
  n, B = trainer.train_windows.num_windows, config.train.batch_size
  windows = np.concatenate([trainer.train_windows.get(batches.eval_indices(b, n, B))
                            for b in range(STATS_BATCHES)])
  z = model.encode_tokens(windows).reshape(-1, config.vae.latent_dim)
  params = model.dit_params
  np.testing.assert_allclose(params['latent_mean'], z.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(params['latent_std'], z.std(0), rtol=1e-3)
  latents, tokens = model.sample(2, steps=4, seed=0)
  assert latents.shape == (2, 8, config.vae.latent_dim) and tokens.shape == (2, 32)
  # Latents come back in the VAE's units: decoding them gives the same tokens.
  np.testing.assert_array_equal(model.decode_tokens(latents), tokens)


def test_a_bfloat16_config_on_the_cpu_warns_once_when_the_run_starts(
    corpus, vae_run, tmp_path, caplog, monkeypatch):
  """Both stages of a run in one process (as `all` starts them), one line; none for
  a float32 config. Each warns when its Trainer is made, once the run can start."""
  monkeypatch.setattr(trainer_lib, '_WARNED', set())
  bf16 = dict(compute_dtype='bfloat16')
  with caplog.at_level('WARNING'):
    trainer_lib.Trainer(train_fixtures.micro_config(*corpus, **bf16),
                        str(tmp_path / 'vae'))
    trainer_lib.Trainer(train_fixtures.micro_config(
        *corpus, stage='diffusion', vae_workdir=vae_run, **bf16),
        str(tmp_path / 'diffusion'))
    found = [r.getMessage() for r in caplog.records
             if 'found only the CPU' in r.getMessage()]
    assert len(found) == 1 and 'compute_dtype=bfloat16' in found[0], found
    monkeypatch.setattr(trainer_lib, '_WARNED', set())
    trainer_lib.Trainer(train_fixtures.micro_config(*corpus), str(tmp_path / 'fp32'))
  assert len([r for r in caplog.records if 'found only the CPU' in r.getMessage()]) == 1
