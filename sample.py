"""Uses a trained TokCom: generate from noise, reconstruct, encode or decode text.

  python sample.py --steps 50                                 # latest diffusion run
  python sample.py --prompt "def main():" --num_samples 4
  python sample.py --mode reconstruct --input_text "Some text"
  python sample.py --mode encode --input_file a.py --output_file z.npy
  python sample.py --mode decode --input_file z.npy
  python sample.py --workdir runs/tiny/ar --prompt "def "   # the autoregressive stage
"""

import glob
import json
import os

from absl import flags

from tokcom_jax import cli

_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run to load: a diffusion run, a VAE run (reconstruct, encode,'
    ' decode) or an ar run (generate); default: the most recently trained diffusion'
    ' run under runs/.')
_VAE_WORKDIR = flags.DEFINE_string(
    'vae_workdir', None, 'Where the VAE of a stage-2 run is, when not where the run'
    ' recorded it (a moved stage-1 run).')
_MODE = flags.DEFINE_enum('mode', 'generate',
                          ['generate', 'reconstruct', 'encode', 'decode'], 'What to do.')
_STEPS = flags.DEFINE_integer('steps', 50, 'Euler steps from noise to latents.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 2, 'Texts to generate.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'Samples per batch'
                                   ' (default: all at once).')
_NUM_CHUNKS = flags.DEFINE_integer('num_chunks', None, 'Latents per sample'
                                   ' (default: as trained, max_length / chunk_size).')
_NUM_TOKENS = flags.DEFINE_integer('num_tokens', None, 'ar runs: new tokens per sample'
                                   ' (default: what fits in the trained context).')
_PROMPT = flags.DEFINE_string('prompt', None, 'Text the samples start with.')
_INPUT_TEXT = flags.DEFINE_string('input_text', None, 'Text for reconstruct/encode.')
_INPUT_FILE = flags.DEFINE_string('input_file', None, 'Text file (reconstruct,'
                                  ' encode) or .npy latents (decode).')
_OUTPUT_FILE = flags.DEFINE_string('output_file', None, 'encode: .npy latents;'
                                   ' generate: JSONL; others: text.')
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed.')
_TEMPERATURE = flags.DEFINE_float('temperature', None, 'Token sampling temperature'
                                  ' (0: argmax; default: 0 for TokCom\'s chunk decoder,'
                                  ' 1 for an ar run).')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Keep the k most likely tokens (0: all).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass.')

SEPARATOR = '\n' + '─' * 60 + '\n'


def latest_diffusion_run(root: str = 'runs') -> str:
  runs = [os.path.dirname(d) for d in glob.glob(os.path.join(root, '**', 'checkpoints'),
                                                recursive=True)
          if os.path.exists(os.path.join(os.path.dirname(d), 'config.json'))
          and json.load(open(os.path.join(os.path.dirname(d), 'config.json'))
                        ).get('stage') == 'diffusion']
  if not runs:
    from tokcom_jax.checkpoint import CheckpointError
    raise CheckpointError(f'no trained diffusion run under {root}/: train one'
                          ' (python train.py --config configs/tiny.py:all) or pass'
                          ' --workdir.')
  return max(runs, key=lambda r: os.path.getmtime(os.path.join(r, 'checkpoints')))


def read_input() -> str:
  if _INPUT_FILE.value:
    with open(_INPUT_FILE.value, encoding='utf-8') as f:
      return f.read()
  if _INPUT_TEXT.value is None:
    from tokcom_jax.sampling import SamplingError
    raise SamplingError(f'--mode {_MODE.value} needs --input_text or --input_file.')
  return _INPUT_TEXT.value


def main(argv):
  del argv
  import numpy as np
  import tokcom_jax
  from tokcom_jax import files
  from tokcom_jax.sampling import AutoregressiveLM, SamplingError
  workdir = _WORKDIR.value or latest_diffusion_run()
  print(f'workdir: {workdir}', flush=True)
  if _STEPS.value < 1:
    raise SamplingError(f'--steps must be a positive number, got {_STEPS.value}.')
  model = tokcom_jax.load(workdir, _VAE_WORKDIR.value)
  sampling = dict(seed=_SEED.value, top_k=_TOP_K.value, top_p=_TOP_P.value)
  if _TEMPERATURE.value is not None:
    sampling['temperature'] = _TEMPERATURE.value
  out = _OUTPUT_FILE.value
  if isinstance(model, AutoregressiveLM) and _MODE.value != 'generate':
    raise SamplingError(f'{workdir} is an autoregressive (ar) run: it can only'
                        ' --mode generate.')
  if _MODE.value == 'generate':
    if isinstance(model, AutoregressiveLM):
      texts = model.generate(_NUM_SAMPLES.value, _NUM_TOKENS.value,
                             prompt=_PROMPT.value, batch_size=_BATCH_SIZE.value,
                             **sampling)
    else:
      texts = model.generate(_NUM_SAMPLES.value, _NUM_CHUNKS.value, _STEPS.value,
                             prompt=_PROMPT.value, batch_size=_BATCH_SIZE.value,
                             **sampling)
    print(SEPARATOR.join(texts))
    if out:
      files.write_text(out, ''.join(json.dumps({'sample': i, 'text': t}) + '\n'
                                    for i, t in enumerate(texts)))
  elif _MODE.value == 'reconstruct':
    text = model.reconstruct(read_input(), **sampling)
    print(text)
    if out:
      files.write_text(out, text)
  elif _MODE.value == 'encode':
    z = model.encode(read_input())
    print(f'latents {z.shape} {z.dtype}')
    if out:  # as np.save names it
      with files.atomic_open(out if out.endswith('.npy') else out + '.npy') as f:
        np.save(f, z)
  else:
    if not (_INPUT_FILE.value or '').endswith('.npy'):
      raise SamplingError('--mode decode needs --input_file latents.npy.')
    try:
      z = np.load(_INPUT_FILE.value, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise SamplingError(f'cannot read latents from {_INPUT_FILE.value}: {e}') from e
    text = model.decode(z, **sampling)
    print(text)
    if out:
      files.write_text(out, text)


if __name__ == '__main__':
  cli.run(main)
