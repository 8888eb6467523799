"""Benchmark: `tvtool materialize` against the I/O floor and mergekit, with peak RSS.

On a synthetic Llama-8B-shaped pair (4096 hidden, 14336 MLP, 1024 KV, 128256 vocab,
bf16; --layers sets the size), in one run:
  - I/O floor: read both inputs once and write the outputs once with plain file copies;
  - tvtool materialize for 1 α and for 5 α (one pass);
  - mergekit-yaml task_arithmetic for the same 5 α (one run per α, as mergekit needs);
  - peak RSS of each (/usr/bin/time -v), and tvtool's peak RSS at twice the model size;
  - --operators: TIES (density 0.2) and DARE (p 0.3) at the same 5 α, and mergekit's ties/dare_linear;
  - --repeat N: each row N times in a row, the fastest reported (the machine is shared).
Page caches are dropped before each measurement when permitted (root).

    python bench/bench_materialize.py --layers 1 --out bench/_work   # 2.5 GB per checkpoint
Results go to stdout as a markdown table; paste them into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tvtool.io.writer import ShardedWriter, human  # noqa: E402

H, I, KV, V = 4096, 14336, 1024, 128256
ALPHAS = (0.2, 0.4, 0.6, 0.8, 1.2)


def layer_shapes(layers: int, vocab: int):
    yield "model.embed_tokens.weight", (vocab, H)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (H,)
        yield p + "self_attn.q_proj.weight", (H, H)
        yield p + "self_attn.k_proj.weight", (KV, H)
        yield p + "self_attn.v_proj.weight", (KV, H)
        yield p + "self_attn.o_proj.weight", (H, H)
        yield p + "post_attention_layernorm.weight", (H,)
        yield p + "mlp.gate_proj.weight", (I, H)
        yield p + "mlp.up_proj.weight", (I, H)
        yield p + "mlp.down_proj.weight", (H, I)
    yield "model.norm.weight", (H,)
    yield "lm_head.weight", (vocab, H)


def make_model(folder: Path, layers: int, seed: int, base: Path | None = None, vocab: int = V) -> None:
    """A bf16 checkpoint in 5 GB-style shards (2 GB here); the reasoner = base + small noise."""
    if (folder / "config.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    plan = [(n, torch.bfloat16, s) for n, s in layer_shapes(layers, vocab)]
    w = ShardedWriter(folder=folder, plan=plan, metadata={"format": "pt"},
                      max_shard_size=(2 if base is None else 3) * 10**9)
    g = torch.Generator().manual_seed(seed)
    for name, _, shape in plan:
        rows = shape[0]
        step = max(1, (1 << 24) // (shape[1] if len(shape) > 1 else 1))
        for s in range(0, rows, step):
            e = min(rows, s + step)
            chunk = torch.randn((e - s, *shape[1:]), generator=g) * 0.02
            w.write(name, chunk.to(torch.bfloat16))
    w.close()
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
           "intermediate_size": I, "num_attention_heads": 32, "num_key_value_heads": 8,
           "num_hidden_layers": layers, "vocab_size": vocab, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
           "max_position_embeddings": 8192, "tie_word_embeddings": False, "rope_theta": 500000.0}
    (folder / "config.json").write_text(json.dumps(cfg))


def drop_caches() -> None:
    subprocess.run(["sync"])
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def timed(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a command, via /usr/bin/time -v."""
    drop_caches()
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) * 1024
    return wall, rss


def io_floor(base: Path, reasoner: Path, out: Path, n: int) -> list[str]:
    """A shell command that reads both inputs once and writes n copies of the base's files."""
    script = f"cat {reasoner}/*.safetensors > /dev/null; " + "; ".join(
        f"mkdir -p {out}/c{i} && cp {base}/*.safetensors {out}/c{i}/" for i in range(n)) + "; sync"
    return ["bash", "-c", script]


# operator rows: (label, tvtool materialize options, mergekit method, mergekit per-model parameters)
OPERATORS = [("ties density 0.2", ["--method", "ties", "--density", "0.2"], "ties", {"density": 0.2}),
             ("dare_linear p 0.3", ["--method", "dare_linear", "--drop-p", "0.3"], "dare_linear", {"density": 0.7})]


def tvtool_cmd(base: Path, reasoner: Path, out: Path, alphas, extra=()) -> list[str]:
    args = [sys.executable, "-m", "tvtool", "materialize", str(base), "--reasoner", str(reasoner), "-o", str(out),
            "--no-progress", "--overwrite", *extra]
    for a in alphas:
        args += ["--alpha", str(a)]
    return ["bash", "-c", " ".join(args) + " && sync"]


def mergekit_cmds(base: Path, reasoner: Path, out: Path, alphas, method: str = "task_arithmetic",
                  params: dict | None = None) -> list[str]:
    """One mergekit-yaml run per α (mergekit writes one model per run); α is the weight, or λ for operators."""
    mk = Path(sys.executable).with_name("mergekit-yaml")
    parts = []
    for a in alphas:
        cfg = out / f"mk-{method}-{a}.yml"
        model = {"weight": a} if params is None else {"weight": 1.0, **params}
        text = (f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {reasoner}\n    parameters:\n"
                + "".join(f"      {k}: {v}\n" for k, v in model.items())
                + ("" if params is None else f"parameters:\n  lambda: {a}\n")
                + "dtype: float32\nout_dtype: bfloat16\n")
        cfg.write_text(text)
        parts.append(f"{mk} {cfg} {out}/mk-{method}-{a} --quiet --no-copy-tokenizer")
    return ["bash", "-c", " && ".join(parts) + " && sync"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=1, help="1 layer: 2.5 GB per checkpoint")
    ap.add_argument("--out", type=Path, default=Path("bench/_work"))
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--skip-x2", action="store_true", help="skip the doubled model (peak RSS flatness)")
    ap.add_argument("--operators", action="store_true", help="add TIES and DARE rows (tvtool 5 α; mergekit 5 runs)")
    ap.add_argument("--skip-torch", action="store_true", help="skip the TVTOOL_FUSED=0 row")
    ap.add_argument("--repeat", type=int, default=1, help="runs per row; the fastest is reported")
    args = ap.parse_args()
    work = args.out
    base, reasoner = work / f"base-{args.layers}", work / f"reasoner-{args.layers}"
    make_model(base, args.layers, 0)
    make_model(reasoner, args.layers, 1, base)
    big_b, big_r = work / f"base-x2-{args.layers}", work / f"reasoner-x2-{args.layers}"
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    rows = []

    def run(label, cmd, cleanup):  # the fastest of --repeat runs (the machine is shared), the largest peak RSS
        walls, rsss = [], []
        for _ in range(args.repeat):
            wall, rss = timed(cmd)
            shutil.rmtree(cleanup, ignore_errors=True)
            walls.append(wall)
            rsss.append(rss)
        rows.append((label, min(walls), max(rsss)))
        print(f"{label}: {min(walls):.1f} s (runs: {', '.join(f'{w:.1f}' for w in walls)}), peak RSS {human(max(rsss))}",
              flush=True)

    out = work / "outputs"
    run("I/O floor, 1 output (plain copies)", io_floor(base, reasoner, out, 1), out)
    run("I/O floor, 5 outputs (plain copies)", io_floor(base, reasoner, out, 5), out)
    run("tvtool materialize, 1 α", tvtool_cmd(base, reasoner, out, ALPHAS[:1]), out)
    run("tvtool materialize, 5 α (one pass)", tvtool_cmd(base, reasoner, out, ALPHAS), out)
    if not args.skip_torch:
        run("tvtool materialize, 5 α, torch arithmetic (TVTOOL_FUSED=0)",
            ["env", "TVTOOL_FUSED=0", *tvtool_cmd(base, reasoner, out, ALPHAS)], out)
    for label, opts, method, params in OPERATORS if args.operators else ():
        run(f"tvtool materialize {label}, 5 α (one pass)", tvtool_cmd(base, reasoner, out, ALPHAS, opts), out)
        if not args.skip_mergekit:
            out.mkdir(parents=True, exist_ok=True)
            run(f"mergekit-yaml {method} ({label}), 5 α (5 runs)",
                mergekit_cmds(base, reasoner, out, ALPHAS, method, params), out)
    if not args.skip_mergekit:
        out.mkdir(parents=True, exist_ok=True)
        run("mergekit-yaml task_arithmetic, 1 α", mergekit_cmds(base, reasoner, out, ALPHAS[:1]), out)
        out.mkdir(parents=True, exist_ok=True)
        run("mergekit-yaml task_arithmetic, 5 α (5 runs)", mergekit_cmds(base, reasoner, out, ALPHAS), out)
    shutil.rmtree(base.parent / "outputs", ignore_errors=True)
    if args.skip_x2:
        return _report(rows, args, size, None)
    make_model(big_b, 2 * args.layers, 0, vocab=2 * V)  # every tensor kind doubled: 2× the bytes
    make_model(big_r, 2 * args.layers, 1, big_b, vocab=2 * V)
    size2 = sum(f.stat().st_size for f in big_b.glob("*.safetensors"))
    run(f"tvtool materialize, 1 α, model ×2 ({human(size2)})", tvtool_cmd(big_b, big_r, out, ALPHAS[:1]), out)
    _report(rows, args, size, size2)


def _report(rows, args, size, size2) -> None:
    t = {label: (w, r) for label, w, r in rows}
    floor5 = t["I/O floor, 5 outputs (plain copies)"][0]
    tv5 = t["tvtool materialize, 5 α (one pass)"][0]
    print(f"\nModel: {args.layers} Llama-8B layer(s) + embed + lm_head, {human(size)} bf16 per checkpoint "
          f"(inputs {human(2 * size)}, 5 outputs {human(5 * size)}).\n")
    print("| run | wall s | × I/O floor (5 outputs) | peak RSS |\n|---|---:|---:|---:|")
    for label, w, r in rows:
        print(f"| {label} | {w:.1f} | {w / floor5:.2f} | {human(r)} |")
    print(f"\n- tvtool 5 α / I/O floor: {tv5 / floor5:.2f}× (target ≤ 1.5×)")
    if "mergekit-yaml task_arithmetic, 5 α (5 runs)" in t:
        print(f"- mergekit 5 runs / tvtool 5 α: {t['mergekit-yaml task_arithmetic, 5 α (5 runs)'][0] / tv5:.2f}× "
              "(target ≥ 3×)")
    for label, _, method, _ in OPERATORS:
        a, b = f"tvtool materialize {label}, 5 α (one pass)", f"mergekit-yaml {method} ({label}), 5 α (5 runs)"
        if a in t:
            print(f"- {label}: tvtool 5 α / I/O floor {t[a][0] / floor5:.2f}×"
                  + (f"; mergekit 5 runs / tvtool {t[b][0] / t[a][0]:.2f}×, peak RSS {human(t[b][1])} vs "
                     f"{human(t[a][1])}" if b in t else ""))
    fused0 = "tvtool materialize, 5 α, torch arithmetic (TVTOOL_FUSED=0)"
    if fused0 in t:
        print(f"- fused kernels vs torch arithmetic, 5 α: {t[fused0][0] / tv5:.2f}× faster "
              f"({t[fused0][0] / floor5:.2f}× → {tv5 / floor5:.2f}× the floor)")
    if size2 is None:
        return
    r1 = t["tvtool materialize, 1 α"][1]
    r2 = t[f"tvtool materialize, 1 α, model ×2 ({human(size2)})"][1]
    print(f"- tvtool peak RSS: {human(r1)} → {human(r2)} when the model doubles ({r2 / r1:.2f}×; target < 1.5 GB, flat)")


if __name__ == "__main__":
    main()
