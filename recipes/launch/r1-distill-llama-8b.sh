#!/usr/bin/env bash
# The valves of recipes/r1-distill-llama-8b.yaml (`train:` entries) with the paper's Llama settings (A.2): LoRA r 32,
# lora_alpha 64, lr 4e-5 cosine, weight decay 0.01, batch 64, on 8×A5000-24G; R1-Distill-Llama-8B's chains of up
# to 8192 tokens plus the prompt (--max-seq-len 8704).
# Memory plan (tvtool train valve++ --model deepseek-ai/DeepSeek-R1-Distill-Llama-8B "${OPTS[@]}" --gpus 8
# --gpu-memory 24GB --plan): 21.1 GiB per process of 22.4 GiB (logits of a 128K vocabulary at 8704 tokens are
# 12.5 GiB of it); Llama-3.1-8B's own 2K-token chains (--max-seq-len 2304, A.2) plan 9.2 GiB. Replicated (DDP)
# the 16 GB bf16 base leaves too little even with checkpointing at micro-batch 1.
# Data: the recipe's MixChain-Z (`tvtool sweep recipes/r1-distill-llama-8b.yaml` writes $OUT/mixchain); the sweep
# counts these adapters as its own `train:` stages (--fsdp, --grad-checkpointing, --grad-accum only say how).
set -euo pipefail
OUT=${OUT:-runs/r1-distill-llama-8b}
MODEL=deepseek-ai/DeepSeek-R1-Distill-Llama-8B
OPTS=(--preset llama --precision bf16 --max-seq-len 8704 --fsdp --grad-checkpointing --grad-accum 8)
torchrun --nproc_per_node 8 -m tvtool train valve++ --model "$MODEL" --data "$OUT/mixchain" "${OPTS[@]}" \
  -o "$OUT/train/plusplus"
torchrun --nproc_per_node 8 -m tvtool train progressive --model "$MODEL" --data "$OUT/mixchain" "${OPTS[@]}" \
  --epochs 2 -o "$OUT/train/progressive"
# The same with accelerate:
#   accelerate launch --config_file recipes/accelerate/8-gpus.yaml -m tvtool train valve++ --model "$MODEL" …
