"""Train the toy CoT-Valve++ LoRA on a GPU and measure it as a task vector (transformers greedy).

Checks that `tvtool train` runs unchanged on CUDA and that the trained valve, applied as a task
vector θ + α·Δθ through tvtool's one merge path, controls length as the CPU-trained one does:

    python scripts/gpu_check_valve.py --data MIXCHAIN_DIR --out OUT [--cpu-adapter ADAPTER]

Writes OUT/gpu_check.json: per α, accuracy (paper rule, A.1) and mean #tokens on the toy test set
(300 questions, EOS not counted).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from tvtool.merge.config import MergeConfig
from tvtool.merge.stream import merged_tensors
from tvtool.engine.prompting import PromptOptions
from tvtool.vectors.source import DeltaSource
from tvtool.evaluation.scoring import score
from tvtool.toy import REASONER_DIR, TEST_PATH, load_model, read_jsonl
from tvtool.valve.train import train
from tvtool.valve.options import TrainOptions


def greedy(model, tok, questions, device: str, max_new_tokens: int = 200) -> list[list[int]]:
    """Greedy continuations (EOS and after stripped), batched with left padding."""
    tok.padding_side = "left"
    eos, out = tok.eos_token_id, []
    for s in range(0, len(questions), 100):
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False) for q in questions[s:s + 100]]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id)
        for row in gen[:, enc["input_ids"].shape[1]:].tolist():
            out.append(row[:row.index(eos)] if eos in row else row)
    return out


def measure(adapter: Path, alphas, device: str) -> list[dict]:
    tok = AutoTokenizer.from_pretrained(str(REASONER_DIR))
    rows = read_jsonl(path=TEST_PATH)
    base, tv = (opened := DeltaSource(base=str(REASONER_DIR), delta=str(adapter)).open()).base, opened.tv
    out = []
    for a in alphas:
        state = dict(merged_tensors(base=base, tv=tv, config=MergeConfig(a)))
        model = load_model(path=REASONER_DIR, state=state).to(device)
        gens = greedy(model, tok, [r["question"] for r in rows], device)
        # the paper's rule (A.1), as `tvtool eval` scores: last \boxed{}, else the last number
        ok = sum(score(tok.decode(g), str(r["gold"]), kind="gsm8k").correct for g, r in zip(gens, rows))
        out.append({"alpha": a, "accuracy": round(ok / len(rows), 4),
                    "mean_tokens": round(sum(map(len, gens)) / len(rows), 2)})
        print(out[-1], flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--cpu-adapter")
    args = p.parse_args()
    out = Path(args.out)
    opts = TrainOptions(rank=8, lora_alpha=16.0, lr=2e-3, scheduler="constant", weight_decay=0.01, epochs=4,
                        batch_size=32, progress=False)
    t0 = time.time()
    # The toy is prompted with the bare question in its chat template (recipes/toy-valve.yaml: instruction "").
    res = train(mode="valve++", model=str(REASONER_DIR), data=args.data, output=str(out / "plusplus"), options=opts,
                prompt=PromptOptions(instruction=""))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
              "train_s": round(time.time() - t0, 1), "final_loss": res.final_loss}
    alphas = (0.0, 0.25, 0.5, 0.75, 1.0)
    report["gpu_trained"] = measure(out / "plusplus", alphas, dev)
    if args.cpu_adapter:
        report["cpu_trained"] = measure(Path(args.cpu_adapter), alphas, dev)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
