"""On a GPU: the memory plan of `tvtool train` against torch.cuda.max_memory_allocated.

A synthetic ~1.1B Llama-shaped model (TinyLlama's shapes: hidden 2048, 22 layers, 32 heads / 4 kv heads,
vocabulary 32000; random bf16 weights, word-level tokenizer) trains valve++ (LoRA r 8, all linear layers) for
two steps in bf16 at each --seq-lens length, with and without --grad-checkpointing, micro-batch 2 (one sample
padded, so attention gets a mask as in real batches). Per case the plan's tensors (its peak without the
overhead term, which is the CUDA context and allocator slack that max_memory_allocated does not count) against
the measured peak; target: within 15%.

    python scripts/gpu_check_memory.py --out reports/gpu-memory

Writes OUT/gpu_check_memory.json. Never run by the tests.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tvtool.engine.prompting import PromptOptions
from tvtool.valve.options import TrainOptions
from tvtool.valve.train import train

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000)


def make_model(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    if (folder / "config.json").is_file():
        return folder
    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(SHAPE["vocab_size"] - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPE, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>", chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}"
                            ).save_pretrained(folder)
    return folder


def make_data(path: Path, seq_len: int) -> Path:
    """Two pairs: one of exactly `seq_len` tokens (12-word prompt + solution + EOS), one 10% shorter."""
    rows = []
    for k, n in enumerate((seq_len, int(seq_len * 0.9))):
        rows.append({"question": " ".join(f"w{(7 * j) % 1000 + 4}" for j in range(11)),
                     "solution": " ".join(f"w{(13 * j + k) % 30000 + 4}" for j in range(n - 12)),
                     "beta": 0.5 + 0.5 * k})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("reports/gpu-memory"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/tvtool-gpu-memory"))
    ap.add_argument("--seq-lens", default="1024,2048,4096")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a GPU"
    model = make_model(args.work / "model")
    cases = []
    for t in [int(x) for x in args.seq_lens.split(",")]:
        for ckpt in (False, True):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            name = f"t{t}-{'ckpt' if ckpt else 'full'}"
            res = train(mode="valve++", model=model, data=make_data(args.work / f"{name}.jsonl", t),
                        output=args.work / name, prompt=PromptOptions(instruction=""),
                        options=TrainOptions(rank=8, lora_alpha=16, lr=1e-4, batch_size=2, epochs=1, max_steps=2,
                                             precision="bf16", grad_checkpointing=ckpt, progress=False, overwrite=True))
            plan, measured = res.record["memory_plan"], res.record["execution"]["peak_device_bytes"][0]
            tensors = plan["peak"] - plan["components"]["overhead"]
            cases.append({"seq_len": plan["seq_len"], "grad_checkpointing": ckpt, "micro_batch": plan["micro_batch"],
                          "planned_tensors_bytes": tensors, "planned_peak_bytes": plan["peak"],
                          "measured_max_allocated_bytes": measured, "error": round(tensors / measured - 1, 4),
                          "components": plan["components"], "seconds": round(time.time() - t0, 1)})
            print(f"{name}: planned {tensors / 2**30:.2f} GiB, measured {measured / 2**30:.2f} GiB, "
                  f"error {cases[-1]['error']:+.1%}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": SHAPE, "target": 0.15,
              "within_target": all(abs(c["error"]) <= 0.15 for c in cases), "cases": cases}
    (args.out / "gpu_check_memory.json").write_text(json.dumps(report, indent=1))
    print(f"→ {args.out / 'gpu_check_memory.json'}")


if __name__ == "__main__":
    main()
