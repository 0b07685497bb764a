"""tokcom_jax: a chunk VAE and a latent flow-matching transformer for text, in JAX."""

import os

# transformers is used for tokenizers only; its "PyTorch was not found" notice is noise.
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')


def load(workdir: str, vae_workdir: str | None = None):
  """Loads a trained run: see `tokcom_jax.sampling.TokCom`."""
  from tokcom_jax import sampling
  return sampling.load(workdir, vae_workdir)
