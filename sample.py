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

from absl import flags, logging

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
_STEPS = flags.DEFINE_integer(
    'steps', None, "Euler steps from noise to latents (of each chunk's head in a"
    " chunk generator); default: the run's sample.steps.")
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
_TEMPERATURE = flags.DEFINE_float('temperature', None, 'Token sampling temperature,'
                                  ' >= 0 (0: argmax; default: 0 for TokCom\'s chunk'
                                  ' decoder, 1 for an ar run).')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Keep the k most likely tokens (0: all; at'
                              ' most the vocabulary).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass, in (0, 1] (1: all).')
_NOISE_SCALE = flags.DEFINE_float('noise_scale', None, 'TokCom: the starting noise'
                                  ' × this, > 0 (< 1: less diverse, nearer the data;'
                                  ' default: the run\'s sample.noise_scale).')

SEPARATOR = '\n' + '─' * 60 + '\n'


def _stage(run: str) -> str | None:
  """The stage a run's config.json names; None (and a warning) when unreadable."""
  path = os.path.join(run, 'config.json')
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f).get('stage')
  except (OSError, ValueError, AttributeError) as e:
    logging.warning('skipping %s: its config.json cannot be read (%s)', run, e)
    return None


def latest_diffusion_run(root: str = 'runs') -> str:
  runs = [os.path.dirname(d) for d in glob.glob(os.path.join(root, '**', 'checkpoints'),
                                                recursive=True)]
  runs = [r for r in runs if _stage(r) in ('diffusion', 'reflow')]  # a stage-2 run
  if not runs:
    from tokcom_jax.errors import CheckpointError
    raise CheckpointError(f'no trained diffusion run under {root}/: train one'
                          ' (python train.py --config configs/tiny.py:all) or pass'
                          ' --workdir.')
  return max(runs, key=lambda r: os.path.getmtime(os.path.join(r, 'checkpoints')))


def read_input() -> str:
  if _INPUT_TEXT.value is not None:
    return _INPUT_TEXT.value
  try:
    with open(_INPUT_FILE.value, encoding='utf-8') as f:
      return f.read()
  except UnicodeDecodeError:
    from tokcom_jax.errors import SamplingError
    raise SamplingError(f'--input_file={_INPUT_FILE.value}: not UTF-8 text (give a text'
                        ' file; .npy latents are for --mode decode).') from None


def read_latents():
  import numpy as np
  from tokcom_jax.errors import SamplingError
  try:
    with open(_INPUT_FILE.value, 'rb') as f:
      header = f.read(6)
    z = np.load(_INPUT_FILE.value, allow_pickle=False)
  except ValueError as e:  # not an .npy array (pickled objects are never loaded)
    reason = (str(e) if header == b'\x93NUMPY' else  # np.load's own guess misleads
              'not a .npy file: it does not start with the NumPy header')
    raise SamplingError(f'--input_file={_INPUT_FILE.value}: cannot read latents'
                        f' ({reason}); write them with --mode encode'
                        ' --output_file=LATENTS.npy.') from e
  cli.check_latents(z, _INPUT_FILE.value)
  return z


def main(argv):
  del argv
  values = flags.FLAGS.flag_values_dict()
  cli.check_sample_flags(values)  # every flag, before anything is loaded
  text = read_input() if _MODE.value in ('reconstruct', 'encode') else None
  latents = read_latents() if _MODE.value == 'decode' else None
  import numpy as np
  import tokcom_jax
  from tokcom_jax.errors import SamplingError
  from tokcom_jax.inference.autoregressive import AutoregressiveLM
  from tokcom_jax.storage import files
  workdir = _WORKDIR.value or latest_diffusion_run()
  print(f'workdir: {workdir}', flush=True)
  model = tokcom_jax.load(workdir, _VAE_WORKDIR.value)
  if isinstance(model, AutoregressiveLM) and _MODE.value != 'generate':
    raise SamplingError(f'{workdir} is an autoregressive (ar) run: it can only'
                        ' --mode generate.')
  cli.check_sampling_for_run(values, model.config, workdir)
  sampling = dict(seed=_SEED.value, top_k=_TOP_K.value, top_p=_TOP_P.value)
  if _TEMPERATURE.value is not None:
    sampling['temperature'] = _TEMPERATURE.value
  out = _OUTPUT_FILE.value
  if _MODE.value == 'generate':
    if isinstance(model, AutoregressiveLM):
      texts = model.generate(_NUM_SAMPLES.value, _NUM_TOKENS.value,
                             prompt=_PROMPT.value, batch_size=_BATCH_SIZE.value,
                             **sampling)
    else:
      texts = model.generate(_NUM_SAMPLES.value, _NUM_CHUNKS.value, _STEPS.value,
                             prompt=_PROMPT.value, batch_size=_BATCH_SIZE.value,
                             noise_scale=_NOISE_SCALE.value, **sampling)
    print(SEPARATOR.join(texts))
    if out:
      files.write_text(out, ''.join(json.dumps({'sample': i, 'text': t}) + '\n'
                                    for i, t in enumerate(texts)))
  elif _MODE.value == 'reconstruct':
    text = model.reconstruct(text, **sampling)
    print(text)
    if out:
      files.write_text(out, text)
  elif _MODE.value == 'encode':
    z = model.encode(text)
    print(f'latents {z.shape} {z.dtype}')
    if out:  # as np.save names it
      with files.atomic_open(out if out.endswith('.npy') else out + '.npy') as f:
        np.save(f, z)
  else:
    cli.check_latents(latents, _INPUT_FILE.value, model.latent_dim)
    text = model.decode(latents, **sampling)
    print(text)
    if out:
      files.write_text(out, text)

if __name__ == '__main__':
  cli.run(main)
