#!/usr/bin/env bash
# The GPU/TPU numbers in one command, printed as Markdown for benchmarks/RESULTS.md:
#   1. train-step throughput and MFU of both stages in bfloat16 (bench and v5.2 shapes;
#      the same VAE in PyTorch beside it when torch is installed);
#   2. sampling speed, TokCom against an autoregressive model with a KV cache, at
#      batch 1 / 8 / 64 and 1024 tokens (HF Qwen2 in PyTorch when torch is installed,
#      else this package's `ar` stage);
#   3. a short v5.2-shaped stage-1 training run (the embedded corpus and tokenizer, so
#      that it needs no network), whose first and last losses are shown.
#
#   bash benchmarks/accelerator.sh           # on a GPU or TPU machine (pip install -e .[cuda12] / .[tpu])
#   bash benchmarks/accelerator.sh --quick   # reduced, CPU-sized: checks the script end to end
#
# Results: $ACCELERATOR_OUT (default runs/accelerator): train.jsonl, sampling.jsonl, smoke/.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
case "${1:-}" in
  --quick) quick=1 ;;
  '') ;;
  *) echo "error: unknown argument '$1': use --quick or nothing." >&2; exit 2 ;;
esac
out="${ACCELERATOR_OUT:-runs/accelerator}"
mkdir -p "$out"
python -c 'import torch' 2>/dev/null && have_torch=1 || have_torch=0

if (( quick )); then
  # The tiny widths with one layer per stack: every step of the full run, compiled fast.
  one_layer='vae.encoder_layers=1,vae.decoder_layers=1,dit.num_layers=1'
  python benchmarks/train_step.py --quick --no_torch --steps 1 --set "$one_layer" \
    > "$out/train.jsonl"
  python benchmarks/sampling.py --quick --baseline jax --batch_sizes 1 --steps 2 \
    > "$out/sampling.jsonl"
  smoke="configs/tiny.py:vae,$one_layer,train.vae.num_steps=4,log_every=2,eval_every=0,sample_every=0"
  label='tiny-shaped stage 1, one layer per stack (--quick)'
else
  torch_args=(--no_torch); baseline=jax
  if (( have_torch )); then torch_args=(); baseline=torch; fi
  python benchmarks/train_step.py --configs bench,v52 --dtype bfloat16 "${torch_args[@]}" \
    > "$out/train.jsonl"
  python benchmarks/sampling.py --config v52 --dtype bfloat16 --tokens 1024 \
    --batch_sizes 1,8,64 --baseline "$baseline" > "$out/sampling.jsonl"
  label='v5.2-shaped stage 1'
  smoke='configs/v52.py:vae,data.source=stdlib,tokenizer=bpe:1024,train.vae.epochs=0,train.vae.num_steps=50,log_every=10,eval_every=0,sample_every=0,wandb.mode=disabled'
fi
rm -rf "$out/smoke"
python train.py --config "$smoke" --workdir "$out/smoke"
echo
echo "## Accelerator run, $(date -u +%F)"
echo
python benchmarks/markdown.py "$out/train.jsonl" "$out/sampling.jsonl" \
  --smoke "$out/smoke/metrics.jsonl" --smoke_label "$label"
