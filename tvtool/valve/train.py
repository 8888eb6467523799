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
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tvtool.io.atomic import commit_dir, discard, write_json
from tvtool.io.checkpoint import Checkpoint
from tvtool.io.finished import RECORD_KEY, is_finished, stage_record
from tvtool.io.lock import output_lock
from tvtool.valve.options import MODES, PRESETS, TrainOptions, resolve
from tvtool.engine.prompting import PromptOptions, load_tokenizer
from tvtool.io.fingerprint import input_fingerprint
from tvtool.valve.train_data import encode, load_train_data, stages_for
from tvtool.valve.train_loop import CHECKPOINT, barrier, run
from tvtool.valve.train_report import write_card, write_plot

RECORD = "train.json"


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
    t0 = time.time()
    result = run(mode=mode, model=str(model), out=out, encoded=encoded, options=o, settings=finished,
                 pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    if result is None:  # not the main process: wait for the main one to finish the folder
        barrier()
        return TrainResult(out, [], [], None, {})
    tmp, losses, stage_dirs, where = result
    final = losses[-1]["loss"] if losses else None
    record = {**settings, "steps": len(losses), "final_loss": final, "losses": losses, **where,
              "seconds": round(time.time() - t0, 1), "stage_folders": [f"stages/{d.name}" for d in stage_dirs],
              "stages": [{k: (len(v) if k == "samples" else v) for k, v in e.items()} | {
                  "steps": sum(1 for x in losses if x["stage"] == e["name"])} for e in encoded]}
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
    ck = Checkpoint.open(model)
    files = sorted(p for p in ck.folder.glob("*") if p.suffix in (".safetensors", ".json") and p.is_file())
    return {"config_sha256": hashlib.sha256((ck.folder / "config.json").read_bytes()).hexdigest()
            if (ck.folder / "config.json").is_file() else None,
            "weights": {p.name: p.stat().st_size for p in files if p.suffix == ".safetensors"}}


def _context(model) -> int:
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
