"""Confirm vLLM (CPU) loads and runs a toy checkpoint, matching transformers greedy ids.

    VLLM_CPU_KVCACHE_SPACE=1 /work/venv/bin/python scripts/vllm_toy.py [--model DIR] [--n 8]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tvtool import toy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=toy.REASONER_DIR)
    ap.add_argument("--n", type=int, default=8, help="number of test prompts")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import torch
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    questions = [r["question"] for r in toy.read_jsonl(path=args.model.parent / "test.jsonl")[:args.n]]
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=False) for q in questions]

    llm = LLM(model=str(args.model), enforce_eager=True, dtype="float32", seed=0)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=200))
    v_ids = [list(o.outputs[0].token_ids) for o in outs]
    v_ids = [ids[:ids.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in ids else ids for ids in v_ids]

    torch.set_num_threads(2)
    model = toy.load_model(path=args.model)
    hf_ids = toy.greedy_generate(model=model, tokenizer=tokenizer, questions=questions)

    same = sum(a == b for a, b in zip(v_ids, hf_ids))
    for q, a, b in zip(questions, v_ids, hf_ids):
        flag = "same" if a == b else "DIFF"
        print(f"[{flag}] {len(a)} vs {len(b)} tokens | vllm: {tokenizer.decode(a)[-60:]!r}")
    print(f"vLLM vs transformers greedy: {same}/{len(questions)} identical token sequences")
    return 0 if same == len(questions) else 1


if __name__ == "__main__":
    sys.exit(main())
