"""`train`: CoT-Valve (§3.1), CoT-Valve++ and CoT-Valve+P (§3.3, Fig. 2) as PEFT LoRA adapters.

Modes (one LoRA Δθ each; PEFT for the LoRA, accelerate for devices and processes):
  valve        fine-tune on one solution column (eq. 2); α scales Δθ at inference.
  valve++      every (question, solution) of a MixChain with its β (eq. 4); the loss of a sample is
               taken at θ + β·Δθ′ (eq. 3): forward hooks multiply each lora_A output (rank r) by
               the sample's own β ([B, 1, 1]), so a batch mixes scales with no grouping. Samples with
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
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from tvtool.engine.prompting import PromptOptions, load_tokenizer
from tvtool.errors import OptionsError
from tvtool.io.atomic import commit_dir, discard, partial_path, write_json
from tvtool.io.checkpoint import Checkpoint
from tvtool.io.finished import RECORD_KEY, is_finished, stage_record
from tvtool.io.fingerprint import input_fingerprint
from tvtool.io.lock import output_lock
from tvtool.io.paths import check_output_apart
from tvtool.valve.options import EXECUTION, MODES, PRESETS, PlanOptions, TrainOptions, resolve
from tvtool.valve.plan import TrainPlan, gib, plan_training
from tvtool.valve.sharding import require_fsdp
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
          options: TrainOptions = TrainOptions(), prompt: PromptOptions = PromptOptions(),
          plan: PlanOptions = PlanOptions()) -> TrainResult:
    """Train a CoT-Valve LoRA on `model` from `data` into the adapter folder `output` (resumable). A run whose
    memory plan (`tvtool.valve.plan`) does not fit `plan.gpu_memory` (default: this device's) is refused
    before the model loads."""
    o = resolve(options, mode=mode)
    if o.fsdp and _world() == 1:
        raise OptionsError("--fsdp in a single process shards nothing", where="--fsdp",
                           fix="launch several processes (torchrun --nproc_per_node N -m tvtool train …), or drop "
                               "--fsdp")
    if o.fsdp:
        require_fsdp()
    out = Path(output)
    # Never over an input: --overwrite would delete the model, and the adapter would replace the data. The
    # resumable `<output>.partial/` is checked too: it is written and replaced as well.
    check_output_apart(out, [model, data])
    check_output_apart(partial_path(out), [model, data], flag="-o (resume folder)")
    # One writer per adapter folder (tvtool.io.lock): the main process holds the lock for the whole run, so the
    # resumable `<output>.partial/` it keeps (tvtool.io.atomic.resumable_dir) is never another live run's.
    main = os.environ.get("RANK", "0") == "0"  # accelerate/torchrun: the other processes write nothing
    with output_lock(out) if main else contextlib.nullcontext():
        return _train(mode=mode, model=model, data=data, out=out, o=o, prompt=prompt, plan=plan)


def plan_run(*, mode: str, model: str | os.PathLike, data: str | os.PathLike | None = None,
             options: TrainOptions = TrainOptions(), prompt: PromptOptions = PromptOptions(),
             plan: PlanOptions = PlanOptions()) -> TrainPlan:
    """`train --plan`: the memory plan of a run, training nothing. Needs only the model's config.json; with
    `data` (and the model's tokenizer) the planned length is the longest sample that fits --max-seq-len."""
    o = resolve(options, mode=mode)
    longest = None
    if data is not None:
        td, tok, stages = _inputs(mode=mode, model=model, data=data, o=o)
        encoded = _encode(stages, tok=tok, mode=mode, model=model, o=o, prompt=prompt)
        longest, o = _longest(encoded, o)
    gpus = plan.gpus or _world()
    return plan_training(model=model, mode=mode, options=o, gpus=gpus, seq_len=longest,
                         gpu_memory=plan.gpu_memory if plan.gpu_memory is not None else device_memory(processes=gpus))


def train_record(*, mode: str, model: str | os.PathLike, data: str | os.PathLike,
                 options: TrainOptions = TrainOptions(), prompt: PromptOptions = PromptOptions()) -> dict:
    """The finished-work record `train` checks (its `RECORD` file) for these arguments: no tokenizer, no model
    loaded, nothing written (`sweep --plan`)."""
    return _record(mode, model, load_train_data(data), resolve(options, mode=mode), prompt)


def device_memory(*, processes: int | None = None) -> int:
    """Memory per process here: the GPU's; on a CPU, the RAM shared by the `processes` on this machine
    (default: this launch's LOCAL_WORLD_SIZE)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
    n = processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // n


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _inputs(*, mode: str, model, data, o: TrainOptions):
    """(the data, the tokenizer, the stages as (name, samples))."""
    tok = load_tokenizer(model)
    td = load_train_data(data)
    return td, tok, stages_for(mode=mode, data=td, tokenizer=tok, column=o.column)


def _encode(stages, *, tok, mode: str, model, o: TrainOptions, prompt: PromptOptions) -> list[dict]:
    """Each stage as {name, samples (encoded), skipped_long, skipped_zero_beta}."""
    max_len = o.max_seq_len or _context(model)
    encoded = []
    for name, samples in stages:
        enc, long = encode(samples=samples, tokenizer=tok, prompt=prompt, max_seq_len=max_len)
        zero = sum(e.beta == 0 for e in enc) if mode == "valve++" and o.skip_zero_beta else 0
        enc = [e for e in enc if not (zero and e.beta == 0)]
        encoded.append({"name": name, "samples": enc, "skipped_long": long, "skipped_zero_beta": zero})
    return encoded


def _longest(encoded: list[dict], o: TrainOptions) -> tuple[int, TrainOptions]:
    """(the longest sample, the options with the batch a step can take: at most a stage's samples)."""
    longest = max((len(e.input_ids) for st in encoded for e in st["samples"]), default=1)
    return longest, replace(o, batch_size=min(o.batch_size, max(len(st["samples"]) for st in encoded) or 1))


def _check_plan(*, mode: str, model, encoded: list[dict], o: TrainOptions, plan: PlanOptions) -> TrainPlan | None:
    """The run's memory plan at its longest sample and largest step; refuses (one line: the numbers and the fix)
    one that does not fit. None for a model type the plan does not know (said in a warning)."""
    longest, planned = _longest(encoded, o)
    try:
        p = plan_training(model=model, mode=mode, options=planned, gpus=_world(), seq_len=longest,
                          gpu_memory=plan.gpu_memory if plan.gpu_memory is not None else device_memory())
    except OptionsError as e:
        if not e.what.startswith("no memory plan"):
            raise
        warnings.warn(f"{e.what}: memory not checked before loading")
        return None
    if plan.check_memory and p.fits is False:
        fix = f"use {p.fix.text()} ({gib(p.fix.peak)})" if p.fix else "use more or larger GPUs"
        base = gib(p.params * (2 if o.precision == "bf16" else 4) // (p.processes if p.fsdp else 1))
        raise OptionsError(f"the memory plan needs {gib(p.peak)} per process, more than the {gib(p.device_memory)} "
                           "available", where=f"{p.processes} process{'es' * (p.processes > 1)}, micro-batch "
                           f"{p.micro_batch} × {p.seq_len} tokens, base {base}{' per shard' if p.fsdp else ''}",
                           fix=f"{fix}; see `tvtool train {mode} --model … --plan`, or pass --no-check-memory")
    return p


def _train(*, mode: str, model, data, out: Path, o: TrainOptions, prompt: PromptOptions,
           plan: PlanOptions) -> TrainResult:
    td, tok, stages = _inputs(mode=mode, model=model, data=data, o=o)
    settings = _settings(mode, model, td, o, prompt)
    finished = _record(mode, model, td, o, prompt)  # the one finished-work rule (tvtool.io.finished): no paths
    if is_finished(out, finished, overwrite=o.overwrite, what=f"train {out.name}", name=RECORD):
        rec = json.loads((out / RECORD).read_text())
        return TrainResult(out, [out / s for s in rec.get("stage_folders", [])], rec["losses"], rec["final_loss"],
                           rec, skipped=True)
    encoded = _encode(stages, tok=tok, mode=mode, model=model, o=o, prompt=prompt)
    planned = _check_plan(mode=mode, model=model, encoded=encoded, o=o, plan=plan)  # before the model loads
    if out.exists() and _is_main():  # --overwrite (is_finished raised otherwise): a different run is replaced
        discard(out)
    t0 = time.time()
    result = run(mode=mode, model=str(model), out=out, encoded=encoded, options=o, settings=finished,
                 pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    if result is None:  # not the main process: wait for the main one to finish the folder
        barrier()
        return TrainResult(out, [], [], None, {})
    tmp, losses, stage_dirs, execution = result
    final = losses[-1]["loss"] if losses else None
    record = {**settings, "steps": len(losses), "final_loss": final, "losses": losses,
              "processes": execution["processes"], "device": execution["device"], "execution": execution,
              "memory_plan": planned.to_dict() if planned else None,
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
            "options": {k: v for k, v in asdict(o).items() if k not in EXECUTION},
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
    opts = {k: v for k, v in asdict(o).items() if k not in EXECUTION}
    return stage_record(stage="train", options={"mode": mode, **opts, "prompt": asdict(prompt),
                                                "columns": td.columns, "layout": td.layout},
                        inputs={"model": input_fingerprint(model), "data": {"sha256": td.fingerprint()}})


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _f(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


__all__ = ["MODES", "PRESETS", "RECORD", "PlanOptions", "TrainOptions", "TrainResult", "device_memory", "plan_run",
           "resolve", "train", "train_record"]
