"""tokcom_jax: a chunk VAE and a latent flow-matching transformer for text, in JAX."""

import os
import sys

if sys.version_info < (3, 11):  # every entry point passes through here
  sys.exit('error: tokcom_jax needs Python 3.11 or newer, not %d.%d: make the virtual'
           ' environment with python3.11 (or newer).' % sys.version_info[:2])

# transformers is used for tokenizers only; its "PyTorch was not found" notice is noise.
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')


def load(workdir: str, vae_workdir: str | None = None):
  """Loads a trained run: a `tokcom_jax.inference.tokcom.TokCom` (a stage-1 or
  stage-2 run) or a `tokcom_jax.inference.autoregressive.AutoregressiveLM` (an `ar`
  run); see `tokcom_jax.inference.loading`."""
  from tokcom_jax.inference.loading import load as load_run
  return load_run(workdir, vae_workdir)
