"""Train the bundled toy base/reasoner pair and write it to tvtool/assets/toy/.

Base: solutions whose optional pieces are each included with a low probability, so
its greedy output is the short bare-arithmetic chain. Reasoner: starts from the base
and is trained on solutions with every piece. Plain torch loop on CPU (2 threads),
seeded; writes bf16 safetensors, configs, tokenizer (with chat template) and the
GSM8K-style test.jsonl / train.jsonl.

    /work/venv/bin/python scripts/train_toy.py [--out DIR] [--base-steps N] [--reasoner-steps N]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from pathlib import Path

# Passive OpenMP waits: on a shared 2-core box, spinning threads make each step ~5x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from transformers import GenerationConfig, LlamaForCausalLM  # noqa: E402

from tvtool import toy  # noqa: E402

SEED = 1234
N_TEST, N_TRAIN_Q = 300, 400
# Per-piece inclusion probabilities for the base; different values spread the α at
# which each piece switches on in the merged model, so length grows gradually.
BASE_P = {"preamble": 0.1, "restate": 0.2, "words": 0.3, "check": 0.3, "conclude": 0.35}


def make_examples(*, tokenizer, problems, rng: random.Random, base: bool) -> list[tuple[list[int], int]]:
    """(token ids of prompt+solution+EOS, prompt length) per problem."""
    out = []
    for p in problems:
        if base:
            pieces = toy.Pieces(**{k: rng.random() < v for k, v in BASE_P.items()})
        else:
            pieces = toy.ALL_PIECES
        prompt = tokenizer.encode(toy.prompt_text(question=toy.question_text(problem=p)), add_special_tokens=False)
        sol = tokenizer.encode(toy.render_solution(problem=p, pieces=pieces), add_special_tokens=False)
        out.append((prompt + sol + [tokenizer.eos_token_id], len(prompt)))
    return out


def batches(*, examples, batch_size: int, rng: random.Random, pad_id: int):
    """Length-bucketed batches in random order: (input_ids, labels) with prompt/pad labels -100."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), rng.random()))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(chunks)
    for idx in chunks:
        width = max(len(examples[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad_id)  # [B, T]
        labels = torch.full((len(idx), width), -100)  # [B, T]
        for r, i in enumerate(idx):
            seq, n_prompt = examples[i]
            ids[r, :len(seq)] = torch.tensor(seq)
            labels[r, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])
        yield ids, labels


def solution_loss(*, model, ids: torch.Tensor, labels: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Next-token cross-entropy on solution tokens only; the LM head runs only where it counts."""
    hidden = model.model(input_ids=ids, attention_mask=(ids != pad_id).long()).last_hidden_state  # [B, T, H]
    target = labels[:, 1:]  # [B, T-1]
    keep = target != -100
    logits = model.lm_head(hidden[:, :-1][keep])  # [N, V]
    return torch.nn.functional.cross_entropy(logits, target[keep])


def train(*, model, tokenizer, sampler, steps: int, lr: float, batch_size: int, rng: random.Random,
          label: str) -> None:
    """AdamW with linear warmup and cosine decay; fresh examples from `sampler(n)` per epoch."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    step, t0, ema = 0, time.time(), None
    while step < steps:
        examples = sampler(batch_size * 50)
        for ids, labels in batches(examples=examples, batch_size=batch_size, rng=rng,
                                   pad_id=tokenizer.pad_token_id):
            # float32: bf16 autocast is ~15x slower on CPUs without bf16 instructions (AVX2 only).
            loss = solution_loss(model=model, ids=ids, labels=labels, pad_id=tokenizer.pad_token_id)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            if step % 100 == 0 or step == steps:
                print(f"[{label}] step {step}/{steps} loss {ema:.4f} {time.time() - t0:.0f}s", flush=True)
            if step >= steps:
                break
    model.eval()


def save(*, model, tokenizer, out: Path) -> None:
    """bf16 safetensors + config + generation config (EOS set) + tokenizer with chat template."""
    out.mkdir(parents=True, exist_ok=True)
    bf16 = LlamaForCausalLM(model.config)
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    bf16.config.dtype = torch.bfloat16
    bf16.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=200)
    bf16.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=toy.ASSET_DIR)
    ap.add_argument("--base-steps", type=int, default=1100)
    ap.add_argument("--reasoner-steps", type=int, default=300)
    # Gentle fine-tune: a small Δ spreads the length transition over α ≈ 0.25-0.8
    # (lr 1e-3 switches every piece on between α = 0.1 and 0.3).
    ap.add_argument("--reasoner-lr", type=float, default=3.5e-5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reuse-base", action="store_true", help="keep OUT/base, retrain the reasoner only")
    args = ap.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    rng = random.Random(SEED)

    test = toy.make_problems(n=N_TEST, seed=SEED + 1)
    train_q = toy.make_problems(n=N_TRAIN_Q, seed=SEED + 2, exclude=test)
    toy.write_jsonl(path=args.out / "test.jsonl", problems=test)
    toy.write_jsonl(path=args.out / "train.jsonl", problems=train_q)
    held_out = {toy.question_text(problem=p) for p in test}

    tokenizer = toy.build_tokenizer()
    config = toy.build_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).float()
    print(f"params: {sum(p.numel() for p in model.parameters()):,}", flush=True)

    def sampler(*, base: bool):
        def draw(n: int):
            probs = []
            while len(probs) < n:
                p = toy.random_problem(rng=rng)
                if toy.question_text(problem=p) not in held_out:
                    probs.append(p)
            return make_examples(tokenizer=tokenizer, problems=probs, rng=rng, base=base)
        return draw

    t0 = time.time()
    if not args.reuse_base:
        train(model=model, tokenizer=tokenizer, sampler=sampler(base=True), steps=args.base_steps,
              lr=3e-3, batch_size=args.batch_size, rng=rng, label="base")
        save(model=model, tokenizer=tokenizer, out=args.out / "base")
    # The reasoner always starts from the saved bf16 base, so --reuse-base runs match full runs.
    model.load_state_dict({k: v.float() for k, v in toy.load_state(path=args.out / "base").items()})
    t1 = time.time()
    rng.seed(SEED + 3)  # reasoner data does not depend on whether the base was retrained
    torch.manual_seed(SEED + 3)
    train(model=model, tokenizer=tokenizer, sampler=sampler(base=False), steps=args.reasoner_steps,
          lr=args.reasoner_lr, batch_size=args.batch_size, rng=rng, label="reasoner")
    t2 = time.time()
    save(model=model, tokenizer=tokenizer, out=args.out / "reasoner")
    print(f"base {t1 - t0:.0f}s, reasoner {t2 - t1:.0f}s, total {t2 - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
