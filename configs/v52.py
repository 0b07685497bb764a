"""TokCom v5.2: the original recipe at Qwen2-0.5B shapes.

    python train.py --config configs/v52.py:vae
    python train.py --config configs/v52.py:diffusion
    python train.py --config configs/v52.py:ar         # Qwen2-0.5B-shaped baseline
    python train.py --config configs/v52.py:vae,batch_size=16

Shapes: max_length 1024, chunk_size 4 (256 latents per sequence), hidden 896,
14 query heads, 2 KV heads, SwiGLU 4864, RMSNorm, RoPE; CodeLlama-7b tokenizer
(32016 tokens); WikiText-2 raw v1.

VAE depth. The original gives "24 layers" for the VAE without a split. We read it as
the VAE's total: 12 encoder + 12 decoder layers. Why:
  * the decoder runs inside every stage-2 step (forward, and backward through its
    activations), so a 24-layer decoder would make stage 2 cost about 1.5× as much
    for no gain in what the flow model learns;
  * each VAE sequence is only 4 (encoder) or 5 (decoder) positions long: 4 tokens ↔
    896 numbers is an easy map, and 12 layers per side already hold 2×180M
    parameters, more than enough to reach ≥ 99.9% token accuracy;
  * VAE and flow model then have the same total depth, 24.
Change it with `vae,encoder_layers=24,decoder_layers=24`.

The latent is 896-d (the hidden size) and the VAE loss is cross-entropy alone
(kl_weight 0, z = mean), as in the original.

Generation recipe: the original's (raw latents, noise_std 0.05, uniform t and grid,
CE through the frozen decoder + MSE), because this config is the v5.2 spec to
reproduce. On the embedded default that recipe decides a sample's content in the
first few Euler steps and its samples leave the data manifold there
(benchmarks/RESULTS.md); configs/tiny.py defaults to the best recipe measured there.
Take it here with the same modifiers (e.g. `diffusion,standardize=True,noise_std=1.0,
ce_weight=0.0,self_condition=True,order=chunkwise,noise_scale=0.5`, with a VAE trained
with `normalize_latent=True,latent_noise=0.5,prior_weight=0.3`); `recipe=v52`
switches any config back.
"""

from tokcom_jax import config_lib


def get_config(arg: str | None = None):
  config = config_lib.base_config()
  config.compute_dtype = 'bfloat16'
  config.wandb.mode = 'online'  # falls back to offline when no API key is set
  config.vae_workdir = 'runs/v52/vae'
  return config_lib.finalize(config, arg)
