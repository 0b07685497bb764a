"""Bad input as a user types it: one line that names the field, flag or path and says
what to do, raised before any work starts; a trained run is left as it was.

Most cases call the checks in-process (`tokcom_jax.config_checks`, `tokcom_jax.cli`,
`tokcom_jax.cli`); one subprocess per entry point checks the exit code path.
"""

import ast
import errno
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from tokcom_jax import cli, config_checks, config_lib
from tokcom_jax.errors import ConfigError, SamplingError
from tokcom_jax.training import sharding


REPO = pathlib.Path(__file__).resolve().parent.parent


def one_line(error, *fragments):
  """The error's message is one line holding every fragment."""
  message = str(error.value)
  assert '\n' not in message, message
  for fragment in fragments:
    assert fragment in message, (fragment, message)
  return message


def snapshot(*roots) -> dict:
  """Every file under the roots: size, modification time and contents' hash."""
  return {str(p): (p.stat().st_size, p.stat().st_mtime_ns,
                   hashlib.sha256(p.read_bytes()).hexdigest())
          for root in roots for p in sorted(pathlib.Path(root).rglob('*'))
          if p.is_file()}


# ---------------------------------------------------------------- config fields

CONFIG_CASES = {  # get_config argument → the whole message
    'vae,train.batch_size=0':
        'train.batch_size=0: must be a positive integer'
        ' (set --config.train.batch_size=N)',
    'vae,train.batch_size=-4':
        'train.batch_size=-4: must be a positive integer'
        ' (set --config.train.batch_size=N)',
    'vae,chunk_size=0':
        'chunk_size=0: must be a positive integer (set --config.chunk_size=N)',
    'vae,max_length=0':
        'max_length=0: must be a positive integer (set --config.max_length=N)',
    'vae,log_every=0':
        'train.log_every=0: must be a positive integer (set --config.train.log_every=N)',
    'vae,vae.latent_dim=0':
        'vae.latent_dim=0: must be a positive integer (set --config.vae.latent_dim=N)',
    'vae,eval_batches=0':
        'train.eval_batches=0: must be a positive integer'
        ' (set --config.train.eval_batches=N)',
    'vae,train.vae.lr=-0.001':
        'train.vae.lr=-0.001: must be a positive number (set --config.train.vae.lr=X)',
    'diffusion,train.diffusion.lr=nan':
        'train.diffusion.lr=nan: must be a positive number'
        ' (set --config.train.diffusion.lr=X)',
    'ar,train.ar.lr=inf':
        'train.ar.lr=inf: must be a positive number (set --config.train.ar.lr=X)',
    'vae,compute_dtype=float16':
        "compute_dtype='float16': must be one of 'bfloat16', 'float32'"
        ' (set --config.compute_dtype=bfloat16)',
    'vae,t_schedule=cosine':
        "flow.t_schedule='cosine': must be one of 'uniform', 'logit_normal'"
        ' (set --config.flow.t_schedule=uniform)',
    'vae,wandb.mode=onlin':
        "wandb.mode='onlin': must be one of 'disabled', 'online', 'offline'"
        ' (set --config.wandb.mode=disabled)',
    'vae,latent_dropout=1.0':
        'vae.latent_dropout=1.0: must be a number in [0, 1)'
        ' (set --config.vae.latent_dropout=X)',
    'vae,token_dropout=-0.1':
        'vae.token_dropout=-0.1: must be a number in [0, 1)'
        ' (set --config.vae.token_dropout=X)',
    'vae,b2=1.5': 'train.b2=1.5: must be a number in [0, 1) (set --config.train.b2=X)',
    'vae,noise_std=0':
        'flow.noise_std=0.0: must be a positive number (set --config.flow.noise_std=X)',
    'vae,ce_min_t=1.5':
        'flow.ce_min_t=1.5: must be a number in [0, 1) (set --config.flow.ce_min_t=X)',
    'vae,mesh.data=0':
        'mesh.data=0: must be a positive integer, or -1 for the devices the other axis'
        ' leaves (set --config.mesh.data=N)',
    'vae,mesh.data=-1,mesh.fsdp=-1':
        'mesh.data=-1, mesh.fsdp=-1: at most one axis can be -1'
        ' (set --config.mesh.fsdp=1)',
    'vae,grad_accum=0':
        'train.grad_accum=0: must be a positive integer'
        ' (set --config.train.grad_accum=N)',
    'vae,keep_checkpoints=0':
        'train.keep_checkpoints=0: must be a positive integer'
        ' (set --config.train.keep_checkpoints=N)',
    'vae,max_nan_steps=0':
        'train.max_nan_steps=0: must be a positive integer'
        ' (set --config.train.max_nan_steps=N)',
    'vae,vocab_size=0':
        'vocab_size=0: must be a positive integer (set --config.vocab_size=N)',
    'vae,seed=-1': 'seed=-1: must be an integer in [0, 2**32 - 1] (set --config.seed=N)',
    'vae,tokenizer=bpe:999999999': ('tokenizer=bpe:999999999, vocab_size=1024: the BPE'
                                    ' would have more tokens than the embeddings have'
                                    ' rows (set --config.vocab_size=999999999, or a'
                                    ' smaller bpe:N)'),
    'vae,seed=4294967296': ('seed=4294967296: must be an integer in [0, 2**32 - 1]'
                            ' (set --config.seed=N)'),
    'vae,tokenizer=bpe:0':
        "tokenizer='bpe:0': must be bpe:<vocab size of at least 260> or a tokenizer"
        ' name or path (set --config.tokenizer=bpe:8192)',
    'vae,tokenizer=bpe:1':  # 256 bytes and the special tokens: not one merge
        "tokenizer='bpe:1': must be bpe:<vocab size of at least 260> or a tokenizer"
        ' name or path (set --config.tokenizer=bpe:8192)',
    'vae,tokenizer=bpe:lots':
        "tokenizer='bpe:lots': must be bpe:<vocab size of at least 260> or a tokenizer"
        ' name or path (set --config.tokenizer=bpe:8192)',
    'vae,source=ftp://host/corpus':
        "data.source='ftp://host/corpus': must be 'stdlib', 'files:<glob>',"
        " 'hf:<path>[:<name>]' or 'tfds:<name>' (set --config.data.source=stdlib)",
    'vae,text_column=':
        "data.text_column='': must be a non-empty string"
        ' (set --config.data.text_column=NAME)',
    'diffusion,ce_weight=0,mse_weight=0':
        'flow.ce_weight=0.0, flow.mse_weight=0.0: stage 2 would learn nothing'
        ' (set --config.flow.mse_weight=1)',
    'vae,train.vae.num_steps=0':  # tiny trains by steps: its epochs are 0
        'train.vae.num_steps=0, train.vae.epochs=0: there is nothing to train'
        ' (set --config.train.vae.num_steps=N)',
    'all,train.diffusion.num_steps=0':
        'train.diffusion.num_steps=0, train.diffusion.epochs=0: there is nothing to'
        ' train (set --config.train.diffusion.num_steps=N)',
    'vae,sample.steps=0':
        'sample.steps=0: must be a positive integer (set --config.sample.steps=N)',
    'vae,dit.num_layers=0':
        'dit.num_layers=0: must be a positive integer (set --config.dit.num_layers=N)',
    'vae,vae.rms_eps=0':
        'vae.rms_eps=0.0: must be a positive number (set --config.vae.rms_eps=X)',
    'vae,warmup_steps=-1':
        'train.warmup_steps=-1: must be an integer >= 0'
        ' (set --config.train.warmup_steps=N)',
    'vae,grad_clip=0':
        'train.grad_clip=0.0: must be a positive number (set --config.train.grad_clip=X)',
    'vae,time_freq_dim=33':
        'dit.time_freq_dim=33: must be an even positive integer'
        ' (set --config.dit.time_freq_dim=N)',
    'vae,max_length=66':
        'max_length=66: is not divisible by chunk_size 4 (set --config.max_length=64)',
    'vae,vae.hidden_size=130':
        'vae.hidden_size=130: is not divisible by vae.num_heads 4'
        ' (set --config.vae.hidden_size=128)',
    'vae,dit.hidden_size=132':
        'dit.hidden_size=132: gives an odd head size 33: rotary embeddings need an even'
        ' one (set --config.dit.hidden_size=128)',
    'vae,ar.num_kv_heads=3':
        'ar.num_heads=4: is not divisible by ar.num_kv_heads 3'
        ' (set --config.ar.num_kv_heads=2)',
    'vae,prior_weight=1.0,normalize_latent=False':
        'vae.prior_weight=1.0, vae.normalize_latent=False: the latent prior would'
        ' shrink unnormalized latents toward zero (set --config.vae.normalize_latent=True)',
    'vae,prior_weight=-1.0':
        'vae.prior_weight=-1.0: must be a number >= 0 (set --config.vae.prior_weight=X)',
}


@pytest.mark.parametrize('arg', list(CONFIG_CASES))
def test_config_field_out_of_range(arg):
  with pytest.raises(ConfigError) as error:
    tiny.get_config(arg)
  assert one_line(error) == CONFIG_CASES[arg]


def test_a_cache_dir_that_is_a_file(tmp_path):
  (tmp_path / 'cache').write_text('')
  with pytest.raises(ConfigError) as error:
    tiny.get_config(f'vae,cache_dir={tmp_path}/cache')
  one_line(error, f"data.cache_dir='{tmp_path}/cache': is a file, not a directory")


def test_every_config_field_has_a_rule():
  """A new field of base_config() fails here until tokcom_jax/config_checks.py has its rule."""
  fields = set(config_lib._leaf_paths(config_lib.base_config()))
  assert fields - set(config_checks.CONFIG) == set(), 'fields without a rule'
  assert set(config_checks.CONFIG) - fields == set(), 'rules of fields that do not exist'
  stage = config_checks.CONFIG['stage']
  for name in config_lib.STAGES + ('all',):
    assert stage.problem(name) is None
  assert stage.problem('vea') is not None


def test_every_shipped_config_is_in_range():
  from configs import v52
  for module in (tiny, v52):
    for stage in config_lib.STAGES:
      config_checks.check_config(module.get_config(stage))
  config_checks.check_config(tiny.get_config('all'))


@pytest.mark.parametrize('data, fsdp, devices, message', [
    (3, 1, 1, 'mesh.data=3: mesh 3x1 (data x fsdp) does not fit the 1 devices there'
              ' are (set --config.mesh.data=-1)'),
    (-1, 2, 1, 'mesh.fsdp=2: mesh -1x2 (data x fsdp) does not fit the 1 devices there'
               ' are (set --config.mesh.fsdp=1)'),
    (2, 2, 2, 'mesh.data=2: mesh 2x2 (data x fsdp) does not fit the 2 devices there'
              ' are (set --config.mesh.data=1)'),
])
def test_mesh_against_the_device_count(data, fsdp, devices, message):
  with pytest.raises(ConfigError) as error:
    sharding.mesh_shape(data, fsdp, devices)
  assert one_line(error) == message
  assert sharding.mesh_shape(-1, 2, 8) == (4, 2)


# ------------------------------------------------------------------------ flags

SAMPLE = dict(mode='generate', steps=50, num_samples=2, seed=0, top_k=0, top_p=1.0)

SAMPLE_CASES = {  # flags over SAMPLE → what the message must hold
    'top_p 1.5': ({'top_p': 1.5}, '--top_p=1.5: must be a number in (0, 1] (pass'
                                  ' --top_p=P)'),
    'top_p 0': ({'top_p': 0.0}, '--top_p=0.0: must be a number in (0, 1]'),
    'temperature -1': ({'temperature': -1.0},
                       '--temperature=-1.0: must be a number >= 0'),
    'top_k -1': ({'top_k': -1}, '--top_k=-1: must be an integer >= 0'),
    'num_chunks 0': ({'num_chunks': 0}, '--num_chunks=0: must be a positive integer'),
    'steps 0': ({'steps': 0}, '--steps=0: must be a positive integer (pass --steps=N)'),
    'num_samples 0': ({'num_samples': 0}, '--num_samples=0: must be a positive integer'),
    'batch_size 0': ({'batch_size': 0}, '--batch_size=0: must be a positive integer'),
    'num_tokens 0': ({'num_tokens': 0}, '--num_tokens=0: must be a positive integer'),
    'seed -1': ({'seed': -1}, '--seed=-1: must be an integer in [0, 2**32 - 1]'),
    'seed 2**32': ({'seed': 2**32}, '--seed=4294967296: must be an integer in'),
    'reconstruct, no input': ({'mode': 'reconstruct'},
                              '--mode reconstruct needs --input_text or'
                              ' --input_file (one of them; got neither)'),
    'decode of text': ({'mode': 'decode', 'input_text': 'x'},
                       '--mode decode reads latents: pass --input_file=LATENTS.npy'),
    'generate with input': ({'input_text': 'def f'},
                            '--mode generate reads no --input_text or --input_file'),
    'prompt to reconstruct': ({'mode': 'reconstruct', 'input_text': 'x', 'prompt': 'y'},
                              '--prompt is for --mode generate'),
}


@pytest.mark.parametrize('case', list(SAMPLE_CASES))
def test_sample_flag_out_of_range(case):
  values, message = SAMPLE_CASES[case]
  with pytest.raises(ConfigError) as error:
    cli.check_sample_flags({**SAMPLE, **values})
  one_line(error, message)


@pytest.fixture
def paths(tmp_path):
  (tmp_path / 'a_file').write_text('x = 1\n')
  (tmp_path / 'a_dir').mkdir()
  return tmp_path


SAMPLE_PATH_CASES = {  # flags (with {root}) → what the message must hold
    'input_file is a directory': (
        {'mode': 'reconstruct', 'input_file': '{root}/a_dir'},
        '--input_file={root}/a_dir: is a directory (give a file)'),
    'input_file is missing': (
        {'mode': 'encode', 'input_file': '{root}/nothing.txt'},
        '--input_file={root}/nothing.txt: does not exist (check the path)'),
    'output_file in a missing directory': (
        {'output_file': '{root}/no_dir/out.jsonl'},
        '--output_file={root}/no_dir/out.jsonl: its directory {root}/no_dir does not'
        ' exist (create it or choose another path)'),
    'output_file is a directory': (
        {'output_file': '{root}/a_dir'},
        '--output_file={root}/a_dir: is a directory (give a file name)'),
    'workdir is a file': (
        {'workdir': '{root}/a_file'},
        '--workdir={root}/a_file: is a file, not a run directory'),
    'workdir is missing': (
        {'workdir': '{root}/no_run'}, '--workdir={root}/no_run: does not exist'),
    'encode to text': (
        {'mode': 'encode', 'input_file': '{root}/a_file', 'output_file': '{root}/z.txt'},
        '--output_file={root}/z.txt: --mode encode writes latents to a .npy file'),
}


@pytest.mark.parametrize('case', list(SAMPLE_PATH_CASES))
def test_sample_path_that_cannot_work(case, paths):
  values, message = SAMPLE_PATH_CASES[case]
  values = {k: v.format(root=paths) for k, v in values.items()}
  with pytest.raises(ConfigError) as error:
    cli.check_sample_flags({**SAMPLE, **values})
  one_line(error, message.format(root=paths))


def with_inf():
  z = np.zeros((4, 16), np.float32)
  z[2, 3] = np.inf
  return z


LATENT_CASES = {  # array → what the message must hold
    'NaN': (np.full((4, 16), np.nan, np.float32), '64 of 64 values are NaN or inf'),
    'one inf': (with_inf(), '1 of 64 values are NaN or inf'),
    'rank 3': (np.zeros((1, 4, 16), np.float32), 'got float32 [1, 4, 16]'),
    'integers': (np.zeros((4, 16), np.int32), 'got int32 [4, 16]'),
    'empty': (np.zeros((0, 16), np.float32), 'got float32 [0, 16] (N >= 1'),
    'width 5': (np.zeros((4, 5), np.float32), 'latents must be a float array [N, 16];'
                                              ' got float32 [4, 5]'),
}


@pytest.mark.parametrize('case', list(LATENT_CASES))
def test_latents_that_cannot_be_decoded(case):
  z, message = LATENT_CASES[case]
  with pytest.raises(SamplingError) as error:
    cli.check_latents(z, 'z.npy', latent_dim=16)
  one_line(error, '--input_file=z.npy: ', message)


EVALUATE = dict(num_samples=64, steps=50, num_windows=256, batch_size=32, seed=0)


@pytest.mark.parametrize('values, message', [
    ({'steps': 0}, '--steps=0: must be a positive integer (pass --steps=N)'),
    ({'num_windows': 0}, '--num_windows=0: must be a positive integer'),
    ({'batch_size': 0}, '--batch_size=0: must be a positive integer'),
    ({'num_samples': -1}, '--num_samples=-1: must be a positive integer'),
    ({'workdir': '{root}/a_file'}, '--workdir={root}/a_file: is a file, not a run'),
    ({'reference': '{root}/no_ar'}, '--reference={root}/no_ar: does not exist'),
], ids=['steps', 'num_windows', 'batch_size', 'num_samples', 'workdir', 'reference'])
def test_evaluate_flag_out_of_range(values, message, paths):
  values = {k: v.format(root=paths) if isinstance(v, str) else v
            for k, v in values.items()}
  with pytest.raises(ConfigError) as error:
    config_checks.check_flags({**EVALUATE, **values}, cli.EVALUATE_FLAGS)
  one_line(error, message.format(root=paths))


TRAIN_CASES = {
    'workdir is a file': ({'workdir': '{root}/a_file'},
                          '--workdir={root}/a_file: is a file, not a directory'
                          ' (remove it or choose another --workdir)'),
    'workdir under a file': ({'workdir': '{root}/a_file/run'},
                             '--workdir={root}/a_file/run: {root}/a_file is a file,'
                             ' not a directory'),
    'num_processes 0': ({'coordinator_address': 'localhost:1234', 'num_processes': 0,
                         'process_id': 0}, '--num_processes=0: must be a positive'),
    'process_id too big': ({'coordinator_address': 'localhost:1234',
                            'num_processes': 2, 'process_id': 5},
                           '--process_id=5: must be below --num_processes=2'),
    'no coordinator': ({'num_processes': 2}, '--num_processes needs'
                                             ' --coordinator_address=HOST:PORT'),
    'coordinator alone': ({'coordinator_address': 'localhost:1234'},
                          '--coordinator_address needs --num_processes and'
                          ' --process_id'),
    'coordinator without port': ({'coordinator_address': 'localhost'},
                                 '--coordinator_address=localhost: must be HOST:PORT'),
}


@pytest.mark.parametrize('case', list(TRAIN_CASES))
def test_train_flag_out_of_range(case, paths):
  values, message = TRAIN_CASES[case]
  values = {k: v.format(root=paths) if isinstance(v, str) else v
            for k, v in values.items()}
  with pytest.raises(ConfigError) as error:
    cli.check_train_flags(values)
  one_line(error, message.format(root=paths))


def test_an_unwritable_workdir(paths, monkeypatch):
  """(Checked through os.access: permissions do not bind the root user.)"""
  monkeypatch.setattr(os, 'access', lambda path, mode: False)
  with pytest.raises(ConfigError) as error:
    cli.check_train_flags({'workdir': f'{paths}/a_dir/run'})
  one_line(error, f'--workdir={paths}/a_dir/run: {paths}/a_dir is not writable')


def test_every_flag_has_a_rule():
  """Every flag an entry point defines has a rule (cli's --verbose aside)."""
  tables = {'train.py': cli.TRAIN_FLAGS, 'sample.py': cli.SAMPLE_FLAGS,
            'tokcom_jax/evaluate.py': cli.EVALUATE_FLAGS,
            'tokcom_jax/resilience.py': cli.RESILIENCE_FLAGS}
  for path, table in tables.items():
    defined = {node.args[0].value for node in ast.walk(ast.parse(
        (REPO / path).read_text())) if isinstance(node, ast.Call)
        and getattr(node.func, 'attr', '').startswith('DEFINE_')}
    assert defined == set(table), path


# -------------------------------------------------------------- a trained run


def run_config(workdir):
  return config_lib.from_dict(json.loads((pathlib.Path(workdir) / 'config.json')
                                         .read_text()))


def test_sampling_flags_beyond_what_the_run_has(runs):
  before = snapshot(*runs)
  config = run_config(runs[1])
  with pytest.raises(ConfigError) as error:
    cli.check_sampling_for_run({'top_k': 10 ** 8}, config, runs[1])
  one_line(error, f'--top_k=100000000: must be at most the 384 tokens of the'
           f' vocabulary of {runs[1]}')
  with pytest.raises(ConfigError) as error:
    cli.check_sampling_for_run({'num_chunks': 9}, config, runs[1])
  one_line(error, '--num_chunks=9: must be between 1 and 8', '(pass --num_chunks=8)')
  assert snapshot(*runs) == before


def test_the_library_refuses_what_the_sampler_cannot_use(runs):
  """tokcom_jax.load(…) users get the same one-line errors as sample.py's."""
  import tokcom_jax
  model = tokcom_jax.load(runs[1])
  with pytest.raises(SamplingError) as error:
    model.decode(np.full((2, 16), np.nan, np.float32))
  one_line(error, 'latents must be finite')
  with pytest.raises(SamplingError) as error:
    model.generate(1, steps=1, temperature=1.0, top_k=10 ** 6)
  one_line(error, 'top_k 1000000 is more than the 384 tokens of the vocabulary')


# ------------------------------------------------------------- the error path

OS_ERRORS = {
    'permission': (PermissionError(errno.EACCES, 'Permission denied', '/data/run'),
                   '/data/run: Permission denied (check its permissions'),
    'disk full': (OSError(errno.ENOSPC, 'No space left on device', '/data/run/x'),
                  '/data/run/x: No space left on device (the disk is full'),
    'not a directory': (NotADirectoryError(errno.ENOTDIR, 'Not a directory', '/a/b'),
                        '/a/b: Not a directory (a part of the path is a file'),
    'is a directory': (IsADirectoryError(errno.EISDIR, 'Is a directory', 'notes'),
                       'notes: Is a directory (give a file, not a directory)'),
    'exists': (FileExistsError(errno.EEXIST, 'File exists', 'runs/x'),
               'runs/x: File exists (something is in the way'),
    'config error': (ConfigError('train.batch_size=0: must be a positive integer'),
                     'train.batch_size=0: must be a positive integer'),
}


@pytest.fixture
def quiet_guard(monkeypatch):
  """cli.guard without its change of the process's log level."""
  monkeypatch.setattr(cli.logging, 'set_verbosity', lambda level: None)
  monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)
  return cli.guard


@pytest.mark.parametrize('case', list(OS_ERRORS))
def test_user_errors_are_one_line_and_exit_code_2(case, quiet_guard, capsys):
  exception, message = OS_ERRORS[case]

  def main(argv):
    raise exception
  with pytest.raises(SystemExit) as exit_:
    quiet_guard(main)(['prog'])
  err = capsys.readouterr().err
  assert exit_.value.code == 2
  assert err.count('\n') == 1 and err.startswith(f'error: {message}'), err
  assert 'Traceback' not in err


def test_verbose_environment_shows_the_traceback(quiet_guard, monkeypatch):
  def main(argv):
    raise IsADirectoryError(errno.EISDIR, 'Is a directory', 'notes')
  monkeypatch.setenv(cli.VERBOSE_ENV, '1')
  with pytest.raises(IsADirectoryError):
    quiet_guard(main)(['prog'])
  monkeypatch.setenv(cli.VERBOSE_ENV, '0')
  with pytest.raises(SystemExit):
    quiet_guard(main)(['prog'])


def test_a_bug_is_not_a_user_error(quiet_guard):
  def main(argv):
    raise KeyError('a bug')
  with pytest.raises(KeyError):
    quiet_guard(main)(['prog'])


# ------------------------------------------------- one subprocess per entry point


def command(*args):
  out = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                       cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  lines = [l for l in (out.stdout + out.stderr).splitlines() if l.strip()]
  assert out.returncode == 2, out.stderr[-3000:]
  assert len(lines) <= 3 and 'Traceback' not in out.stderr, lines
  assert lines[-1].startswith('error: '), lines
  return lines[-1]


@pytest.mark.slow
def test_train_exits_2_before_making_the_workdir(tmp_path):
  line = command('train.py', '--config=configs/tiny.py:vae',
                 '--config.train.batch_size=0', f'--workdir={tmp_path}/run')
  assert line == ('error: train.batch_size=0: must be a positive integer'
                  ' (set --config.train.batch_size=N)')
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_sample_exits_2_and_leaves_the_run_as_it_was(runs, tmp_path):
  before = snapshot(*runs)
  line = command('sample.py', f'--workdir={runs[1]}', '--top_k=100000000',
                 '--temperature=1', f'--output_file={tmp_path}/out.jsonl')
  assert '--top_k=100000000: must be at most the 384 tokens' in line
  assert snapshot(*runs) == before and not (tmp_path / 'out.jsonl').exists()


@pytest.mark.slow
def test_evaluate_exits_2_and_leaves_the_run_as_it_was(runs):
  before = snapshot(*runs)
  line = command('-m', 'tokcom_jax.evaluate', f'--workdir={runs[1]}', '--steps=0')
  assert line == 'error: --steps=0: must be a positive integer (pass --steps=N)'
  assert snapshot(*runs) == before


@pytest.mark.parametrize('source,expected', [
    ('def get_config(:\n  pass\n', ', line 1: invalid syntax (fix the config file)'),
    ('X = 1\n', 'defines no get_config(arg)'),
])
def test_a_broken_config_file_is_one_line_before_absl_runs_it(tmp_path, source, expected):
  path = tmp_path / 'config.py'
  path.write_text(source)
  with pytest.raises(ConfigError) as error:
    config_lib.check_config_file(str(path))
  assert expected in one_line(error) and '\n' not in str(error.value)
  assert config_lib.config_files(['--config', f'{path}:vae', '--config=b.py:x']) == [
      str(path), 'b.py']
  config_lib.check_config_file('configs/tiny.py')  # a good one passes


def test_the_latest_run_search_skips_an_unreadable_config_with_a_warning(tmp_path):
  latest = lambda: subprocess.run(
      [sys.executable, '-c', 'import sys, sample; print(sample.latest_diffusion_run(sys.argv[1]))',
       str(tmp_path)], cwd=REPO, capture_output=True, text=True)
  for i, (name, config) in enumerate((('good', '{"stage": "diffusion"}'),
                                      ('torn', '{"stage": "dif'))):
    (tmp_path / name / 'checkpoints').mkdir(parents=True)
    (tmp_path / name / 'config.json').write_text(config)
    os.utime(tmp_path / name / 'checkpoints', (1000 + i, 1000 + i))
  out = latest()
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == str(tmp_path / 'good')
  assert 'skipping' in out.stderr and 'torn' in out.stderr
  # Stage 2 with reflow: the reflowed run, not its teacher inside it.
  for name, stage, when in (('two/teacher', 'diffusion', 2000), ('two', 'reflow', 3000)):
    (tmp_path / name / 'checkpoints').mkdir(parents=True)
    (tmp_path / name / 'config.json').write_text(f'{{"stage": "{stage}"}}')
    os.utime(tmp_path / name / 'checkpoints', (when, when))
  assert latest().stdout.strip() == str(tmp_path / 'two')


def test_a_stage_2_run_on_the_wrong_vae_is_named_for_what_it_is(runs, ar_run):
  from tokcom_jax.stages.vae import trained_config
  config = run_config(runs[1])
  with pytest.raises(ConfigError) as error:
    trained_config(config, ar_run)
  one_line(error, f"vae_workdir={ar_run} is a 'ar' run, not a VAE")
  with pytest.raises(ConfigError) as error:
    trained_config(config, runs[1])
  one_line(error, f"vae_workdir={runs[1]} is a 'diffusion' run, not a VAE")
  config.unlock()
  config.vae.latent_dim = 32
  with pytest.raises(ConfigError) as error:
    trained_config(config, runs[0])
  one_line(error, f'vae.latent_dim=32: the VAE at {runs[0]} has latents of 16 (set'
           ' --config.vae.latent_dim=16')


def test_a_model_that_cannot_fit_is_refused_before_any_work(corpus, tmp_path,
                                                            monkeypatch):
  from tests import train_fixtures
  from tokcom_jax.errors import TrainingError
  from tokcom_jax.training import trainer as trainer_lib, train_state
  monkeypatch.setattr(train_state, 'device_memory_bytes', lambda: 1000)  # bytes
  with pytest.raises(TrainingError) as error:
    trainer_lib.Trainer(train_fixtures.micro_config(*corpus), str(tmp_path / 'run'))
  one_line(error, 'the model needs about', 'more than the 0.0 GB one device has')
  assert not (tmp_path / 'run' / 'checkpoints').exists()
  # The estimate: parameters twice (with their gradients) and AdamW's two moments.
  config = train_fixtures.micro_config(*corpus)
  from tokcom_jax import stages
  from tokcom_jax.training import sharding
  _, state = train_state.abstract_state(stages.get(config).build, sharding.make_mesh(-1, 1),
                                        train_state.make_optimizer(config.train, 1e-3, 1)[0])
  params = train_state.per_device_bytes(state['params'])
  assert abs(train_state.per_device_bytes(state['opt_state']) - 2 * params) < 1024


def test_flags_a_run_does_not_use_are_refused_not_ignored():
  cli.check_flags_apply({'steps': None, 'num_tokens': None}, 'ar', 'runs/a')
  with pytest.raises(ConfigError) as error:
    cli.check_flags_apply({'steps': 50}, 'ar', 'runs/a')
  one_line(error, '--steps=50: runs/a is an autoregressive (ar) run, which does not'
           ' use it (leave it out; --num_tokens for its length)')
  with pytest.raises(ConfigError) as error:
    cli.check_flags_apply({'num_tokens': 8}, 'diffusion', 'runs/d')
  one_line(error, '--num_tokens=8: runs/d is a TokCom run')
  for flag in cli.TOKCOM_ONLY:
    with pytest.raises(ConfigError):
      cli.check_flags_apply({flag: 1}, 'ar', 'runs/a')


def test_eval_batches_beyond_the_validation_windows_are_clamped_with_one_warning(
    caplog):
  from tokcom_jax.data import batches
  with caplog.at_level('WARNING'):
    counts = [batches.eval_batch_count(16, 70, 32) for _ in range(3)]
  assert counts == [3, 3, 3]  # 70 windows fill 3 batches of 32 (the last wraps)
  warnings = [r.getMessage() for r in caplog.records]
  assert warnings == ['train.eval_batches=16 is more than the 3 batches of 70'
                      ' validation windows: evaluating 3.']
  assert batches.eval_batch_count(2, 70, 32) == 2
  assert batches.eval_batch_count(5, 5, 32) == 1


def test_sampling_of_several_batches_shows_progress_once_it_takes_seconds():
  from tokcom_jax.inference.autoregressive import batch_starts
  bar = batch_starts(10, 4)
  assert not bar.disable and bar.delay == 2
  assert list(bar) == [0, 4, 8]
  assert batch_starts(4, 4).disable  # one batch: nothing to count


@pytest.mark.parametrize('make, fragment', [
    (lambda root: str(root / 'no_such_tokenizer'),
     "tokenizer '{path}': no such directory; pass a directory holding tokenizer.json"),
    (lambda root: (root / 'tok').mkdir() or (root / 'tok' / 'tokenizer.json').write_text(
        'not json') and str(root / 'tok'),
     "tokenizer '{path}': {path}/tokenizer.json is not a tokenizer file"
     ' (JSONDecodeError'),
])
def test_a_local_tokenizer_that_is_missing_or_not_json_is_named_not_the_hub(
    tmp_path, make, fragment):
  from tokcom_jax.data import tokenizer
  from tokcom_jax.errors import DataError
  path = make(tmp_path)
  with pytest.raises(DataError) as error:
    tokenizer.load_tokenizer(path)
  message = one_line(error, fragment.format(path=path))
  assert 'cannot be reached' not in message


def test_a_text_file_named_npy_is_not_called_pickled(tmp_path):
  bad = tmp_path / 'latents.npy'
  bad.write_text('hello\n')
  out = subprocess.run(
      [sys.executable, 'sample.py', '--workdir', str(tmp_path), '--mode', 'decode',
       f'--input_file={bad}'], capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1] == (
      f'error: --input_file={bad}: cannot read latents (not a .npy file: it does not'
      ' start with the NumPy header); write them with --mode encode'
      ' --output_file=LATENTS.npy.')
