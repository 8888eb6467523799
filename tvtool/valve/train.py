"""`train`: CoT-Valve (§3.1), CoT-Valve++ and CoT-Valve+P (§3.3, Fig. 2) as PEFT LoRA adapters.

Modes (one LoRA Δθ each; PEFT for the LoRA, accelerate for devices and processes):
  valve        fine-tune on one solution column (eq. 2); α scales Δθ at inference.
  valve++      every (question, solution) of a MixChain with its β (eq. 4); the loss of a sample is
               taken at θ + β·Δθ′ (eq. 3): forward hooks multiply each lora_B output by the
               sample's own β ([B, 1, 1]), so a batch mixes scales with no grouping. Samples with
               β = 0 give Δθ′ an exactly zero gradient (θ + 0·Δθ′ does not depend on it); they are
               skipped unless `skip_zero_beta` is off (saves compute; the objective's gradient only
               loses zero terms, though the token-mean normaliser then counts only the rest).
  progressive  one LoRA through stages solution_K … solution_1, then solution_0 (longest to
               shortest), `epochs` per stage (paper A.2: 2); each stage starts a fresh optimizer and
               schedule from the previous stage's adapter; every stage's adapter is kept in stages/.

Objective and batching: a step takes `batch_size` samples over all processes and accumulation
steps; its loss is the mean token NLL over all target tokens of the batch (solution + EOS, never
the prompt), so the same step is computed whatever the process count (1 CPU, 1 GPU, or
`accelerate launch` with DDP). Epoch order is a seeded permutation, the same in every process.

Output: `<output>.partial/` during training (checkpoints every `save_steps` steps and at each epoch
end; a re-run with the same settings resumes from the last), renamed to `<output>/` when done:
adapter_config.json + adapter_model.safetensors, README.md (mode, data, hyper-parameters, final
loss), loss.png, stages/ (progressive) and train.json (settings with input fingerprints, written last).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from tvtool.io.atomic import commit_dir, discard, write_json
from tvtool.errors import OptionsError, OutputError
from tvtool.io.finished import RECORD_KEY, is_finished, stage_record
from tvtool.io.lock import output_lock
from tvtool.options import CliOptions, opt
from tvtool.engine.prompting import PromptOptions, load_tokenizer
from tvtool.vectors.source import input_fingerprint

MODES = ("valve", "valve++", "progressive")
RECORD = "train.json"
PRESETS = {  # paper appendix A.2
    "qwq": dict(rank=2, lora_alpha=8.0, lr=1e-5, batch_size=64, epochs=5, weight_decay=0.01),
    "llama": dict(rank=32, lora_alpha=64.0, lr=4e-5, scheduler="cosine", weight_decay=0.01, batch_size=64,
                  epochs=8),
}
DEFAULTS = dict(rank=8, lr=2e-4, scheduler="linear", weight_decay=0.0, batch_size=32, epochs=3)


@dataclass(frozen=True)
class TrainOptions(CliOptions):
    preset: Literal["none", "qwq", "llama"] = opt(
        "none", "Paper settings (A.2). qwq: r 2, lora_alpha 8, lr 1e-5, batch 64, 5 epochs, weight decay 0.01; "
                "llama: r 32, lora_alpha 64, lr 4e-5, cosine, weight decay 0.01, batch 64, 8 epochs. "
                "Options given explicitly win.")
    column: str | None = opt(None, "valve: the solution column to learn (default solution_0; pairs: solution).")
    rank: int | None = opt(None, "LoRA rank r (default 8).")
    lora_alpha: float | None = opt(None, "LoRA alpha: the branch is scaled by lora_alpha/r (default 2·r).")
    rslora: bool = opt(False, "rsLoRA: scale by lora_alpha/sqrt(r).")
    target_modules: str = opt("all-linear", "Layers to adapt: all-linear, or comma-separated module names "
                                            "(q_proj,v_proj).")
    dropout: float = opt(0.0, "LoRA dropout.")
    lr: float | None = opt(None, "Peak learning rate (default 2e-4).")
    scheduler: Literal["constant", "linear", "cosine"] | None = opt(None, "Decay after warm-up (default linear).")
    warmup_ratio: float = opt(0.0, "Share of each stage's steps spent warming up linearly.")
    weight_decay: float | None = opt(None, "AdamW weight decay (default 0).")
    max_grad_norm: float = opt(1.0, "Clip the gradient norm (0: off).")
    epochs: int | None = opt(None, "Epochs (progressive: per stage; paper 2). Default 3, progressive 2.")
    max_steps: int | None = opt(None, "Stop a stage after this many optimizer steps.")
    batch_size: int | None = opt(None, "Samples per optimizer step over all processes and accumulation (default 32).")
    grad_accum: int = opt(1, "Micro-batches per optimizer step in each process.")
    max_seq_len: int | None = opt(None, "Longest prompt + solution; longer samples are skipped and counted "
                                        "(default: the model's max_position_embeddings).")
    seed: int = opt(0, "Seed of the LoRA init, the epoch order and dropout.")
    threads: int = opt(0, "CPU threads for torch (0: torch's default; 1 is fastest on a busy shared CPU).")
    precision: Literal["fp32", "bf16"] = opt("fp32", "fp32; or bf16 (base weights bf16, LoRA fp32, bf16 autocast).")
    skip_zero_beta: bool = opt(True, "valve++: skip samples with β = 0 (their LoRA gradient is exactly zero).")
    save_steps: int = opt(200, "Checkpoint every N optimizer steps (and at each epoch end) for resuming.")
    overwrite: bool = opt(False, "Replace an output folder that holds something else (a finished run with the "
                                 "same settings is kept).")
    progress: bool = opt(True, "Show a progress bar with the loss.")


@dataclass(frozen=True)
class TrainResult:
    folder: Path
    stages: list[Path]  # progressive: one adapter per stage, in training order
    losses: list[dict]  # per optimizer step: stage, step, loss, lr
    final_loss: float | None
    record: dict = field(repr=False)
    skipped: bool = False  # already complete with these settings

    def summary(self) -> str:
        r = self.record
        head = f"adapter → {self.folder}" + (" (already complete)" if self.skipped else "")
        lines = [head, f"  mode {r['mode']}, {r['steps']} steps, final loss {_f(self.final_loss)}, "
                       f"{r['seconds']:.0f} s"]
        lines += [f"  stage {s['name']}: {s['samples']} samples ({s['skipped_long']} too long, "
                  f"{s['skipped_zero_beta']} with β=0 skipped), {s['steps']} steps" for s in r["stages"]]
        return "\n".join(lines)


def resolve(o: TrainOptions, *, mode: str) -> TrainOptions:
    """Fill unset options from the preset, then the defaults; check every value."""
    if mode not in MODES:
        raise OptionsError(f"unknown mode {mode!r}", where="MODE", fix="use valve, valve++ or progressive")
    fill = {**DEFAULTS, **({"epochs": 2} if mode == "progressive" else {}), **PRESETS.get(o.preset, {})}
    o = replace(o, **{k: v for k, v in fill.items() if getattr(o, k) is None})
    if o.lora_alpha is None:
        o = replace(o, lora_alpha=2.0 * o.rank)
    checks = [("rank", o.rank >= 1, "LoRA rank must be ≥ 1"), ("lora-alpha", o.lora_alpha > 0, "lora_alpha must be > 0"),
              ("lr", o.lr > 0, "the learning rate must be > 0"), ("epochs", o.epochs >= 1, "epochs must be ≥ 1"),
              ("batch-size", o.batch_size >= 1, "the batch size must be ≥ 1"),
              ("grad-accum", o.grad_accum >= 1, "grad_accum must be ≥ 1"),
              ("dropout", 0 <= o.dropout < 1, "dropout must be in [0, 1)"),
              ("max-steps", o.max_steps is None or o.max_steps >= 1, "max_steps must be ≥ 1"),
              ("save-steps", o.save_steps >= 1, "save_steps must be ≥ 1"),
              ("warmup-ratio", 0 <= o.warmup_ratio < 1, "warmup_ratio must be in [0, 1)")]
    for flag, ok, what in checks:
        if not ok:
            raise OptionsError(f"{what}, got {getattr(o, flag.replace('-', '_'))}", where=f"--{flag}")
    return o


# --- the verb -----------------------------------------------------------------------------


def train(*, mode: str, model: str | os.PathLike, data: str | os.PathLike, output: str | os.PathLike,
          options: TrainOptions = TrainOptions(), prompt: PromptOptions = PromptOptions()) -> TrainResult:
    """Train a CoT-Valve LoRA on `model` from `data` into the adapter folder `output` (resumable)."""
    o = resolve(options, mode=mode)
    out = Path(output)
    # One writer per adapter folder (tvtool.io.lock): the main process holds the lock for the whole run, so the
    # resumable `<output>.partial/` it keeps (tvtool.io.atomic.resumable_dir) is never another live run's.
    main = os.environ.get("RANK", "0") == "0"  # accelerate/torchrun: the other processes write nothing
    with output_lock(out) if main else contextlib.nullcontext():
        return _train(mode=mode, model=model, data=data, out=out, o=o, prompt=prompt)


def _train(*, mode: str, model, data, out: Path, o: TrainOptions, prompt: PromptOptions) -> TrainResult:
    from tvtool.valve.train_data import encode, load_train_data, stages_for

    tok = load_tokenizer(model)
    td = load_train_data(data)
    stages = stages_for(mode=mode, data=td, tokenizer=tok, column=o.column)
    settings = _settings(mode, model, td, o, prompt)
    finished = _record(mode, model, td, o, prompt)  # the one finished-work rule (tvtool.io.finished): no paths
    if is_finished(out, finished, overwrite=o.overwrite, what=f"train {out.name}", name=RECORD):
        rec = json.loads((out / RECORD).read_text())
        return TrainResult(out, [out / s for s in rec.get("stage_folders", [])], rec["losses"], rec["final_loss"],
                           rec, skipped=True)
    if out.exists() and _is_main():  # --overwrite (is_finished raised otherwise): a different run is replaced
        discard(out)
    max_len = o.max_seq_len or _context(model)
    encoded = []
    for name, samples in stages:
        enc, long = encode(samples=samples, tokenizer=tok, prompt=prompt, max_seq_len=max_len)
        zero = sum(e.beta == 0 for e in enc) if mode == "valve++" and o.skip_zero_beta else 0
        enc = [e for e in enc if not (zero and e.beta == 0)]
        encoded.append({"name": name, "samples": enc, "skipped_long": long, "skipped_zero_beta": zero})
    from tvtool.valve.train_loop import run

    t0 = time.time()
    result = run(mode=mode, model=str(model), out=out, encoded=encoded, options=o, settings=finished,
                 pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    from tvtool.valve.train_loop import CHECKPOINT, barrier

    if result is None:  # not the main process: wait for the main one to finish the folder
        barrier()
        return TrainResult(out, [], [], None, {})
    tmp, losses, stage_dirs, where = result
    final = losses[-1]["loss"] if losses else None
    record = {**settings, "steps": len(losses), "final_loss": final, "losses": losses, **where,
              "seconds": round(time.time() - t0, 1), "stage_folders": [f"stages/{d.name}" for d in stage_dirs],
              "stages": [{k: (len(v) if k == "samples" else v) for k, v in e.items()} | {
                  "steps": sum(1 for x in losses if x["stage"] == e["name"])} for e in encoded]}
    from tvtool.valve.train_report import write_card, write_plot

    write_plot(losses=losses, path=tmp / "loss.png")
    (tmp / "README.md").write_text(write_card(record=record))
    (tmp / CHECKPOINT).unlink(missing_ok=True)
    write_json(tmp / RECORD, {**record, RECORD_KEY: finished}, sort_keys=False)  # last: marks it finished
    commit_dir(tmp, out)  # the resumable <output>.partial/ (tvtool.io.atomic.resumable_dir) into place
    barrier()
    return TrainResult(out, [out / "stages" / d.name for d in stage_dirs], losses, final, record)


def _settings(mode: str, model, td, o: TrainOptions, prompt: PromptOptions) -> dict:
    """What the adapter depends on: options and input fingerprints (model config/weights, data bytes)."""
    return {"mode": mode, "model": {"path": str(model), "fingerprint": _model_fingerprint(model)},
            "data": {"path": str(td.path), "layout": td.layout, "columns": td.columns, "rows": len(td.rows),
                     "sha256": td.fingerprint()},
            "options": {k: v for k, v in asdict(o).items() if k not in ("overwrite", "progress", "save_steps", "threads")},
            "prompt": asdict(prompt)}


def _model_fingerprint(model) -> dict:
    """config.json bytes and the weight files' names and sizes (cheap for 32B checkpoints)."""
    import hashlib

    from tvtool.io.checkpoint import Checkpoint

    ck = Checkpoint.open(model)
    files = sorted(p for p in ck.folder.glob("*") if p.suffix in (".safetensors", ".json") and p.is_file())
    return {"config_sha256": hashlib.sha256((ck.folder / "config.json").read_bytes()).hexdigest()
            if (ck.folder / "config.json").is_file() else None,
            "weights": {p.name: p.stat().st_size for p in files if p.suffix == ".safetensors"}}


def _context(model) -> int:
    from tvtool.io.checkpoint import Checkpoint

    cfg = Checkpoint.open(model).config()
    return int(cfg.get("max_position_embeddings") or cfg.get("text_config", {}).get("max_position_embeddings") or 4096)


def _record(mode: str, model, td, o: TrainOptions, prompt: PromptOptions) -> dict:
    """The finished-work record (tvtool.io.finished): options plus the inputs' content fingerprints —
    the model's files (safetensors headers, sizes, a data sample, config/tokenizer) and the data's
    sha256 — and no paths, so a moved sweep folder or model still counts as finished."""
    opts = {k: v for k, v in asdict(o).items() if k not in ("overwrite", "progress", "save_steps", "threads")}
    return stage_record(stage="train", options={"mode": mode, **opts, "prompt": asdict(prompt),
                                                "columns": td.columns, "layout": td.layout},
                        inputs={"model": input_fingerprint(model), "data": {"sha256": td.fingerprint()}})


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _f(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


__all__ = ["MODES", "PRESETS", "TrainOptions", "TrainResult", "resolve", "train"]
