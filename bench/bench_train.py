"""Benchmark: `tvtool train` against a plain PEFT SFT loop, tokens per second on the same model and batches.

A synthetic Llama-shaped model (fp32; --hidden 256, 4 layers, vocabulary 2048, LoRA r 8 on all linear layers)
and synthetic question/solution pairs whose lengths spread like MixChain's (log-uniform, 16 to --max-len
tokens; β mixed), one fresh process per run:

  plain-sft          a minimal PEFT loop over the same steps and micro-batches (`train_data.micro_batches`,
                     the same seeded permutation), transformers' own loss (labels), AdamW, clipping
  valve              `tvtool train valve` (one column: no β hooks)
  valve++            `tvtool train valve++` (forward hooks scale every lora_B output by the sample's β)
  valve++ ckpt       … --grad-checkpointing
  valve++ groups     … --group-by-length
  valve++ ckpt+groups

Tokens are the real (non-pad) tokens of the micro-batches; seconds are the optimizer steps' (model loading and
checkpoints excluded; tvtool's own count, train.json `execution`), every step counted in every run. Both wall
and CPU seconds (torch on one thread): on a shared machine the CPU time is the steadier measure. The runs are
repeated --repeat times round-robin; each row reports its fastest repeat.

    python bench/bench_train.py --out bench/_work/train --repeat 2
Results go to stdout as a markdown table, and to --out/results.json; paste the table into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RUNS = {"plain-sft": {}, "valve": {"mode": "valve"}, "valve++": {}, "valve++ ckpt": {"grad_checkpointing": True},
        "valve++ groups": {"group_by_length": True},
        "valve++ ckpt+groups": {"grad_checkpointing": True, "group_by_length": True}}


def make_inputs(out: Path, *, hidden: int, layers: int, vocab: int, samples: int, max_len: int,
                seed: int) -> tuple[Path, Path]:
    """(model folder, data .jsonl): a random Llama-shaped model with a word-level tokenizer, and pairs."""
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    model, data = out / "model", out / "pairs.jsonl"
    if not (model / "config.json").is_file():
        words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(vocab - 4)]
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       pad_token="<pad>", chat_template="{% for m in messages %}{{ m['content'] }} "
                                                                        "{% endfor %}")
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                          num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128), head_dim=64,
                          max_position_embeddings=2 * max_len, bos_token_id=1, eos_token_id=2, pad_token_id=3)
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(model)
        fast.save_pretrained(model)
    rng = random.Random(seed)
    rows = []
    for k in range(samples):
        n = int(math.exp(rng.uniform(math.log(16), math.log(max_len))))
        rows.append({"question": " ".join(f"w{rng.randrange(4, vocab - 4)}" for _ in range(12)),
                     "solution": " ".join(f"w{rng.randrange(4, vocab - 4)}" for _ in range(n)),
                     "beta": rng.choice([0.25, 0.5, 0.75, 1.0])})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, data


def _options(args, extra: dict):
    from tvtool.valve.options import TrainOptions

    return TrainOptions(rank=8, lora_alpha=16, lr=1e-3, batch_size=args.batch, grad_accum=args.accum, epochs=1,
                        max_steps=args.steps, threads=args.threads, progress=False, save_steps=10**6,
                        **{k: v for k, v in extra.items() if k != "mode"})


def worker(args) -> dict:
    """One run in this process: {tokens, seconds, cpu_seconds, padding_share}."""
    from tvtool.engine.prompting import PromptOptions

    extra = RUNS[args.worker]
    if args.worker == "plain-sft":
        return plain_sft(args)
    from tvtool.valve.train import train

    res = train(mode=extra.get("mode", "valve++"), model=args.model, data=args.data, output=args.out / "adapter",
                prompt=PromptOptions(instruction=""), options=_options(args, extra))
    ex = res.record["execution"]
    return {"tokens": ex["tokens"], "seconds": ex["train_seconds"], "cpu_seconds": ex["train_cpu_seconds"],
            "padding_share": ex["padding_share"]}


def plain_sft(args) -> dict:
    """The same steps as tvtool's loop (permutation, micro-batches, collation), through PEFT with transformers'
    own loss; only the optimizer steps are timed."""
    import torch

    from tvtool.engine.prompting import PromptOptions, load_tokenizer
    from tvtool.valve.train_data import collate, encode, load_train_data, micro_batches, padding, stages_for
    from tvtool.valve.train_loop import build_peft_model

    o = _options(args, {})
    torch.set_num_threads(o.threads)
    tok = load_tokenizer(args.model)
    (_, samples), = stages_for(mode="valve++", data=load_train_data(args.data), tokenizer=tok)
    enc, _ = encode(samples=samples, tokenizer=tok, prompt=PromptOptions(instruction=""), max_seq_len=10**6)
    net = build_peft_model(str(args.model), rank=o.rank, lora_alpha=o.lora_alpha, target_modules=o.target_modules,
                           dropout=0.0, rslora=False, seed=o.seed, dtype=torch.float32)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=o.lr)
    lengths = [len(e.input_ids) for e in enc]
    perm = torch.randperm(len(enc), generator=torch.Generator().manual_seed(o.seed * 1_000_003)).tolist()
    tokens = pad_total = positions = 0
    seconds = cpu = 0.0
    for step in range(o.max_steps):
        t0, c0 = time.perf_counter(), time.process_time()
        idx = perm[step * o.batch_size:(step + 1) * o.batch_size]
        parts = micro_batches(idx=idx, lengths=lengths, world=1, grad_accum=o.grad_accum)
        for micro in parts[0]:
            b = collate([enc[i] for i in micro], pad_id=tok.pad_token_id)
            out = net(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"], use_cache=False)
            (out.loss / o.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
        pad, pos = padding(parts, lengths)
        tokens, pad_total, positions = tokens + pos - pad, pad_total + pad, positions + pos
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu, "padding_share": round(pad_total / positions, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=160)
    ap.add_argument("--max-len", type=int, default=384)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--worker", choices=list(RUNS))
    ap.add_argument("--model", type=Path)
    ap.add_argument("--data", type=Path)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    model, data = make_inputs(args.out, hidden=args.hidden, layers=args.layers, vocab=args.vocab,
                              samples=args.samples, max_len=args.max_len, seed=0)
    results: dict[str, list[dict]] = {name: [] for name in RUNS}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for rep in range(args.repeat):
        for name in RUNS:
            work = args.out / f"{name.replace(' ', '_').replace('+', 'p')}-{rep}"
            cmd = [sys.executable, __file__, "--out", str(work), "--worker", name, "--model", str(model),
                   "--data", str(data), *(f"--{k}={getattr(args, k)}" for k in ("batch", "accum", "steps", "threads"))]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode:
                sys.exit(f"{name} failed:\n{p.stderr[-3000:]}")
            results[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(name, rep, results[name][-1], file=sys.stderr, flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    best = {n: {"tokens": r[0]["tokens"], "padding_share": r[0]["padding_share"],
                "seconds": min(x["seconds"] for x in r), "cpu_seconds": min(x["cpu_seconds"] for x in r)}
            for n, r in results.items()}
    base = best["plain-sft"]
    print("| run | tokens/CPU-s | × plain SFT | step CPU time × plain SFT | tokens/s (wall) | × plain SFT | padding |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in best.items():
        cps, wps = r["tokens"] / r["cpu_seconds"], r["tokens"] / r["seconds"]
        print(f"| {name} | {cps:.0f} | {cps / (base['tokens'] / base['cpu_seconds']):.2f} | "
              f"{r['cpu_seconds'] / base['cpu_seconds']:.2f} | {wps:.0f} | "
              f"{wps / (base['tokens'] / base['seconds']):.2f} | {r['padding_share']:.3f} |")


if __name__ == "__main__":
    main()
