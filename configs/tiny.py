"""The same code path sized for a 2-core CPU, with no network: the embedded default.

    python train.py --config configs/tiny.py:all     # both stages into runs/tiny/
    python train.py --config configs/tiny.py:vae
    python train.py --config configs/tiny.py:diffusion
    python train.py --config configs/tiny.py:ar        # the autoregressive baseline

Corpus: the running Python's standard-library sources. Tokenizer: a 1024-token
byte-level BPE trained on them and saved inside the run. 64-token windows, 16 latents
of 64 dimensions.
"""

from tokcom_jax import config_lib


def get_config(arg: str | None = None):
  config = config_lib.base_config()
  config.compute_dtype = 'float32'
  # Layers in a Python loop: at these depths a CPU runs the unrolled step faster
  # (benchmarks/RESULTS.md, "Layers under scan"); deep configs scan.
  config.scan_layers = False
  config.tokenizer = 'bpe:1024'
  config.vocab_size = 1024
  config.max_length = 64
  config.chunk_size = 4
  config.data.source = 'stdlib'
  config.vae.update(dict(
      hidden_size=128, encoder_layers=2, decoder_layers=2, num_heads=4,
      num_kv_heads=2, intermediate_size=384, latent_dim=64,
      # A latent space made for the flow (benchmarks/RESULTS.md): every latent at
      # RMS 1, trained under noise of half that size, twice the width it needs
      # clean, so that decoding survives the sampler's errors (99.0% of tokens at
      # 0.5σ, 99.95% clean).
      normalize_latent=True, latent_noise=0.5,
      # A latent prior trained with the VAE (the stage-2 generator), its loss (× 0.3)
      # shaping the latents to be predictable from their context: lower sample
      # perplexity and more valid chunks than without (benchmarks/RESULTS.md).
      prior_weight=0.3))
  config.dit.update(dict(
      hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
      intermediate_size=384))
  config.ar.update(dict(  # the trunk's size: the baseline at equal parameters
      hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
      intermediate_size=384, rope_theta=10_000.0, tie_embeddings=False))
  # The best generation recipe measured on this config (benchmarks/RESULTS.md, "The
  # chunk generator"): a trunk over chunks run once per chunk, reading the latent of
  # the chunk before, and a small flow head (x1 prediction, 3 blocks of 256; the
  # `head` section's other defaults) drawing each latent from 0.35 of the noise, on
  # standardized latents with noise at their own scale, MSE flow matching, then
  # reflowed (below) to draw it in `sample.steps` Euler steps; the VAE's prior is
  # the same generator (reading tokens). The DiT recipe
  # before it: `order=chunkwise,self_condition=True,noise_scale=0.5,steps=50`;
  # `recipe=v52` the original (VAE, flow, sampler).
  config.flow.update(dict(standardize=True, noise_std=1.0, ce_weight=0.0,
                          self_condition=False, order='head'))
  config.head.update(dict(input='latent'))
  config.vae_workdir = 'runs/tiny/vae'
  config.train.update(dict(batch_size=32, warmup_steps=50, log_every=50,
                           eval_every=250, eval_batches=8))
  config.train.vae.update(dict(epochs=0, num_steps=1500, lr=1e-3))
  config.train.diffusion.update(dict(epochs=0, num_steps=1500, lr=1e-3))
  config.train.ar.update(dict(epochs=0, num_steps=1500, lr=1e-3))
  # Stage 2's reflow phase (tokcom_jax/stages/reflow.py): the head re-trained to
  # land in 1 to 4 steps where the 16-step sampler of the generator lands, so that
  # it samples in `sample.steps` = 1 as well as the generator did in 8
  # (benchmarks/RESULTS.md, "Reflow").
  config.train.reflow.update(dict(epochs=0, num_steps=600, lr=3e-4))
  config.sample.update(dict(num_samples=2, sample_every=1,  # at each stage's end
                            noise_scale=0.35, steps=1))
  config.wandb.update(dict(project='TokCom-tiny', mode='disabled'))
  return config_lib.finalize(config, arg,
                            stages=config_lib.STAGES + ('all', 'reflow'))
