#!/usr/bin/env bash
# The valves of recipes/qwq-32b-preview.yaml (`train:` entries) as the paper trained them (A.2): QwQ-32B-Preview,
# LoRA r 2, lora_alpha 8, lr 1e-5, weight decay 0.01, batch 64, on 2×H100-80G; GSM8K chains of up to 4192 tokens
# plus the prompt (--max-seq-len 4608).
# Memory plan (tvtool train valve++ --model Qwen/QwQ-32B-Preview "${OPTS[@]}" --gpus 2 --gpu-memory 80GB --plan):
#   48.9 GiB per process of 74.5 GiB: base 30.5 GiB (a half shard) + 2.4 GiB of gathered units, LoRA state 0.2 GiB,
#   checkpointed activations 2.9 GiB, logits 7.8 GiB, overhead 5.1 GiB. Replicated (DDP) the bf16 base alone is
#   61 GiB per process: 80 GiB even at micro-batch 1 with checkpointing, so --fsdp.
# Data: the recipe's MixChain-Z (`tvtool sweep recipes/qwq-32b-preview.yaml` writes $OUT/mixchain). The options
# that are only how a run executes (--fsdp, --grad-checkpointing, --grad-accum, --group-by-length) are not part
# of the adapter's finished-work record, so the sweep counts these adapters as its own `train:` stages.
set -euo pipefail
OUT=${OUT:-runs/qwq-32b-preview}
MODEL=Qwen/QwQ-32B-Preview
OPTS=(--preset qwq --weight-decay 0.01 --precision bf16 --max-seq-len 4608 --fsdp --grad-checkpointing --grad-accum 32)
PROMPT=(--instruction "Please reason step by step, and put your final answer within \\boxed{}.")
torchrun --nproc_per_node 2 -m tvtool train valve++ --model "$MODEL" --data "$OUT/mixchain" "${OPTS[@]}" \
  "${PROMPT[@]}" -o "$OUT/train/plusplus"
torchrun --nproc_per_node 2 -m tvtool train progressive --model "$MODEL" --data "$OUT/mixchain" "${OPTS[@]}" \
  --epochs 2 "${PROMPT[@]}" -o "$OUT/train/progressive"
# The same with accelerate:
#   accelerate launch --config_file recipes/accelerate/2-gpus.yaml -m tvtool train valve++ --model "$MODEL" …
