"""`evaluate`: generate with vLLM, score, and summarise; one model, an α sweep, checkpoints or LoRA adapters.

Every run writes one folder:
  samples.jsonl  one line per sample (id, index, prompt, response, token_ids, num_tokens, extracted,
                 gold, correct, finish_reason), appended and flushed batch by batch;
  summary.json   accuracy, mean/median #tokens, #truncated, ACU (see `ACU_FORMULA`), per subject;
  run.json       model, α, sampling, dataset, versions, times.
A re-run skips the samples already written (keyed by id and sampling index, a torn last
line is dropped), so an interrupted run finishes into the same summary.

The α sweep starts ONE engine (placeholder weights, the reasoner's config and tokenizer)
and, for each α, loads θ1 + α·Δ in place: no checkpoint is written, no restart.
Checkpoint folders share one engine and are loaded in place when their config.json
(dtype aside) and tokenizer files equal the first folder's; otherwise a new engine starts.
LoRA adapters are served by one engine with enable_lora.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from .checkpoint import Checkpoint
from .data import ProblemSet, load_problems
from .errors import OptionsError, OutputError
from .finite import check_alphas
from .generate import (Engine, EngineOptions, PromptOptions, SamplingOptions, check_sampling, shell_model,
                       uses_chat_template, vllm_version)
from .lock import output_lock
from .materialize import format_alpha
from .options import opt
from .paths import check_output_apart, check_writable

ACU_FORMULA = "ACU = accuracy[%] / (params[B] × mean #tokens) × 10²"
SAMPLES, SUMMARY, RUN = "samples.jsonl", "summary.json", "run.json"


@dataclass(frozen=True)
class EvalOptions:
    dataset: str = opt("gsm8k", "gsm8k | math500 | toy, a .jsonl/.xml path (ASDiv.xml), or a Hub id.")
    split: str = opt("test", "Dataset split.")
    limit: int | None = opt(None, "Evaluate only this many problems (the first N, or N random with --seed).")
    seed: int | None = opt(None, "Shuffle problems with this seed before --limit.")
    kind: str | None = opt(None, "Answer format of a file dataset: gsm8k | math500 | asdiv (default: detected).")
    batch_size: int = opt(64, "Problems per generation batch; results are saved after each batch.")
    params_b: float | None = opt(None, "Nominal model size in billions for ACU (default: counted from weights).")
    score: bool = opt(True, "Score the responses (off: generation only).")
    overwrite: bool = opt(False, "Discard existing results made with other settings.")
    progress: bool = opt(True, "Show a progress bar.")


@dataclass(frozen=True)
class RunResult:
    label: str
    alpha: float | None
    folder: Path
    summary: dict


@dataclass
class EvalResult:
    runs: list[RunResult] = field(default_factory=list)
    table: dict[str, Path] = field(default_factory=dict)  # md/json/png of a multi-run evaluation
    engine_starts: int = 0

    def summary(self) -> str:
        from .report import markdown_table

        lines = [markdown_table(rows=[table_row(r) for r in self.runs]), "", ACU_FORMULA]
        lines += [f"{k}: {v}" for k, v in self.table.items()]
        return "\n".join(lines)


# --- samples.jsonl --------------------------------------------------------------------


def read_samples(path: Path, *, repair: bool = False) -> list[dict]:
    """Complete lines of samples.jsonl; with `repair`, a torn last line (killed writer) is cut off."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if repair and end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    out = []
    for line in data[:end].splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise OutputError("samples.jsonl has a damaged line", where=str(path),
                                  fix="delete the file (or pass --overwrite) to start this run again") from None
    return out


def summarize(*, records: Sequence[dict], params_b: float | None, params_source: str = "counted") -> dict:
    """Accuracy (%), mean/median #tokens, #truncated and ACU over `records` (+ per subject)."""
    n = len(records)
    scored = [r for r in records if r.get("correct") is not None]
    toks = [r["num_tokens"] for r in records]
    acc = 100.0 * sum(bool(r["correct"]) for r in scored) / len(scored) if scored else None
    mean = statistics.fmean(toks) if toks else None
    acu = (acc / (params_b * mean) * 100.0) if acc is not None and params_b and mean else None
    out = {"n_samples": n, "n_problems": len({r["id"] for r in records}), "accuracy": acc,
           "mean_tokens": mean, "median_tokens": statistics.median(toks) if toks else None,
           "truncated": sum(r["finish_reason"] == "length" for r in records),
           "params_b": params_b, "params_source": params_source, "acu": acu, "acu_formula": ACU_FORMULA}
    subjects = sorted({r["subject"] for r in records if r.get("subject")})
    if subjects:
        out["by_subject"] = {s: summarize_small([r for r in records if r.get("subject") == s]) for s in subjects}
    return out


def summarize_small(records: Sequence[dict]) -> dict:
    scored = [r for r in records if r.get("correct") is not None]
    return {"n_samples": len(records),
            "accuracy": 100.0 * sum(bool(r["correct"]) for r in scored) / len(scored) if scored else None,
            "mean_tokens": statistics.fmean(r["num_tokens"] for r in records)}


def count_params_b(path: str | os.PathLike) -> float:
    """Parameters of a checkpoint in billions (each stored tensor once)."""
    ck = Checkpoint.open(path)
    return sum(math.prod(ck.info(n).shape) for n in ck.names()) / 1e9


def table_row(run: RunResult) -> dict:
    s = run.summary
    return {"label": run.label, "alpha": run.alpha, "accuracy": s["accuracy"], "mean_tokens": s["mean_tokens"],
            "acu": s["acu"], "truncated": s["truncated"], "n_samples": s["n_samples"]}


# --- one run --------------------------------------------------------------------------


def run_one(*, engine: Engine, problems: ProblemSet, folder: str | os.PathLike, model: dict,
            prompt: PromptOptions = PromptOptions(), sampling: SamplingOptions = SamplingOptions(),
            options: EvalOptions = EvalOptions(), lora: str | os.PathLike | None = None,
            params_b: float | None = None, params_source: str = "counted",
            prepare: Callable[[], None] | None = None) -> dict:
    """Generate (resuming), score and summarise `problems` with the engine's current weights.

    `prepare` runs once before the first generation, only if something is left to generate
    (the sweep loads θ1 + α·Δ there, so a finished α costs no weight load)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"model": model, "lora": str(lora) if lora else None, "prompt": asdict(prompt),
                "sampling": engine.sampling_record(sampling), "score": options.score,
                "dataset": {k: getattr(problems, k) for k in ("name", "kind", "source", "split")}}
    _check_settings(folder, settings, options.overwrite)
    run = {"settings": settings, "dataset": _dataset_record(problems), "tvtool_version": __version__,
           "vllm_version": vllm_version(),
           "engine": asdict(engine.options), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_json(folder / RUN, run)
    path = folder / SAMPLES
    done = {(r["id"], r["index"]) for r in read_samples(path, repair=True)}
    todo = [p for p in problems if any((p.id, i) not in done for i in range(sampling.n))]
    special = not uses_chat_template(tokenizer=engine.tokenizer, options=prompt)
    total = len(problems) * sampling.n
    if todo and prepare is not None:
        prepare()
    from tqdm.auto import tqdm

    desc = f"{folder.parent.name}/{folder.name}"
    with tqdm(total=total, initial=total - len(todo) * sampling.n, desc=desc, unit="sample",
              disable=not options.progress) as bar, open(path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), options.batch_size):
            batch = todo[start:start + options.batch_size]
            texts = engine.prompts(questions=[p.question for p in batch], options=prompt)
            outs = engine.generate(prompts=texts, sampling=sampling, lora=lora, add_special_tokens=special)
            lines = []
            for p, text, samples in zip(batch, texts, outs):
                for s in samples:
                    if (p.id, s.index) not in done:
                        lines.append(json.dumps(_record(p, text, s, problems.kind, options.score)) + "\n")
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch) * sampling.n)
    summary = summary_of(folder=folder, problems=problems, n=sampling.n, params_b=params_b,
                         params_source=params_source)
    _write_json(folder / SUMMARY, summary)
    _write_json(folder / RUN, {**run, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return summary


def summary_of(*, folder: Path, problems: ProblemSet, n: int, params_b: float | None,
               params_source: str = "counted") -> dict:
    """The summary of this problem set's samples in `folder`, in problem order (one record per key)."""
    by_key = {(r["id"], r["index"]): r for r in read_samples(Path(folder) / SAMPLES)}
    records = [by_key[(p.id, i)] for p in problems for i in range(n) if (p.id, i) in by_key]
    return summarize(records=records, params_b=params_b, params_source=params_source)


def _record(p, prompt: str, s, kind: str, score: bool) -> dict:
    rec = {"id": p.id, "index": s.index, "prompt": prompt, "response": s.text, "token_ids": list(s.token_ids),
           "num_tokens": len(s.token_ids), "gold": p.gold, "finish_reason": s.finish_reason,
           "extracted": None, "correct": None}
    if score:
        from .scoring import score as score_fn

        sc = score_fn(s.text, p.gold, kind=kind)
        rec.update(extracted=sc.extracted, correct=sc.correct)
    for k in ("subject", "level"):
        if k in p.meta:
            rec[k] = p.meta[k]
    return rec


def _dataset_record(ps: ProblemSet) -> dict:
    return {"name": ps.name, "kind": ps.kind, "source": ps.source, "split": ps.split, "n": len(ps),
            "description": ps.description, "excluded": ps.excluded}


def _check_settings(folder: Path, settings: dict, overwrite: bool) -> None:
    f = folder / RUN
    if not f.is_file():
        return
    try:
        old = json.loads(f.read_text()).get("settings")
    except json.JSONDecodeError:
        old = None
    if old == json.loads(json.dumps(settings)):
        return
    if not overwrite:
        raise OutputError("the output folder holds results made with other settings", where=str(folder),
                          fix="pass --overwrite to discard them, or choose another output folder")
    for name in (SAMPLES, SUMMARY, RUN):
        (folder / name).unlink(missing_ok=True)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


# --- the public verb ----------------------------------------------------------------------


def evaluate(*, output: str | os.PathLike, model: str | os.PathLike | None = None,
             base: str | os.PathLike | None = None, delta: str | os.PathLike | None = None,
             reasoner: str | os.PathLike | None = None, alphas: Sequence[float] = (),
             checkpoints: Sequence[str | os.PathLike] = (), loras: Sequence[str | os.PathLike] = (),
             options: EvalOptions = EvalOptions(), prompt: PromptOptions = PromptOptions(),
             sampling: SamplingOptions = SamplingOptions(), engine_options: EngineOptions = EngineOptions(),
             engine: Engine | None = None) -> EvalResult:
    """Evaluate one model, an α sweep, a list of checkpoints, or a list of LoRA adapters.

    - `model`: one checkpoint → `output/` (with `loras`: one run per adapter on that model);
    - `base` + `delta`|`reasoner` + `alphas`: θ1 + α·Δ loaded in place → `output/alpha-<a>/<dataset>/`;
    - `checkpoints`: model folders → `output/<folder name>/<dataset>/`;
    - `model` + `loras` (+ `alphas` as labels, one per adapter) → `output/<alpha-a|adapter>/<dataset>/`.
    Pass `engine` to reuse a running one (it must suit the mode; it is not closed).
    """
    out, res = Path(output), EvalResult()
    mode = _mode(model, base, delta, reasoner, alphas, checkpoints, loras)
    _precheck(out, options, sampling, alphas, [model, base, delta, reasoner, *checkpoints, *loras])
    with output_lock(out):
        return _evaluate(out, res, mode, model=model, base=base, delta=delta, reasoner=reasoner, alphas=alphas,
                         checkpoints=checkpoints, loras=loras, options=options, prompt=prompt, sampling=sampling,
                         engine_options=engine_options, engine=engine)


def _precheck(out: Path, options: EvalOptions, sampling: SamplingOptions, alphas, inputs) -> None:
    """What can fail before the ~30 s engine start: options, α, and where the results go."""
    if options.batch_size < 1:
        raise OptionsError(f"--batch-size must be at least 1, got {options.batch_size}", where="--batch-size")
    check_sampling(sampling)
    check_alphas(alphas)
    check_output_apart(out, inputs)
    check_writable(out)


def _evaluate(out: Path, res: EvalResult, mode: str, *, model, base, delta, reasoner, alphas, checkpoints, loras,
              options: EvalOptions, prompt: PromptOptions, sampling: SamplingOptions,
              engine_options: EngineOptions, engine: Engine | None) -> EvalResult:
    problems = load_problems(dataset=options.dataset, split=options.split, limit=options.limit,
                             seed=options.seed, kind=options.kind)
    common = dict(problems=problems, prompt=prompt, sampling=sampling, options=options)
    ds = _safe(problems.name)
    if loras:
        rank = max([engine_options.max_lora_rank, *(_lora_rank(p) for p in loras)])
        engine_options = replace(engine_options, enable_lora=True, max_lora_rank=rank)
    own: list[Engine] = []

    def start(**kw) -> Engine:
        if engine is not None:
            return engine
        own.append(Engine(options=engine_options, seed=sampling.sample_seed or 0, **kw))
        res.engine_starts += 1
        return own[-1]

    try:
        if mode == "model":
            e = start(model=model)
            if engine is not None and e.weights.get("path") != str(model):
                e.load_weights(path=model)
            pb, src = _params(options, model)
            s = run_one(engine=e, folder=out, model={"path": str(model)}, params_b=pb, params_source=src, **common)
            res.runs.append(RunResult(Path(model).name, None, out, s))
        elif mode == "sweep":
            e = start(model=shell_model(base=base, delta=delta, reasoner=reasoner, folder=out / ".engine-model"),
                      dummy_weights=True)
            pb, src = _params(options, base)
            for a in dict.fromkeys(float(x) for x in alphas):
                load = partial(e.set_alpha, base=base, alpha=a, delta=delta, reasoner=reasoner)
                folder = out / f"alpha-{format_alpha(a)}" / ds
                m = {"base": str(base), "delta": str(delta) if delta else None,
                     "reasoner": str(reasoner) if reasoner else None, "alpha": a}
                s = run_one(engine=e, folder=folder, model=m, params_b=pb, params_source=src, prepare=load,
                            **common)
                res.runs.append(RunResult(f"alpha-{format_alpha(a)}", a, folder, s))
        elif mode == "checkpoints":
            e, first = None, None
            for ck in checkpoints:
                if e is None or not _same_model(first, ck):
                    for x in own:
                        x.close()
                    own.clear()
                    e, first = start(model=ck), ck
                    if engine is not None:
                        e.load_weights(path=ck)
                else:
                    e.load_weights(path=ck)
                pb, src = _params(options, ck)
                folder = out / Path(ck).name / ds
                s = run_one(engine=e, folder=folder, model={"path": str(ck)}, params_b=pb, params_source=src,
                            **common)
                res.runs.append(RunResult(Path(ck).name, _alpha_of(ck), folder, s))
        else:  # loras
            labels = [f"alpha-{format_alpha(a)}" for a in alphas] if alphas else [Path(p).name for p in loras]
            e = start(model=model)
            if engine is not None and e.weights.get("path") != str(model):
                e.load_weights(path=model)
            pb, src = _params(options, model)
            for i, (lab, path) in enumerate(zip(labels, loras)):
                folder = out / lab / ds
                s = run_one(engine=e, folder=folder, model={"path": str(model), "label": lab}, lora=path,
                            params_b=pb, params_source=src, **common)
                res.runs.append(RunResult(lab, float(alphas[i]) if alphas else None, folder, s))
    finally:
        for x in own:
            x.close()
    if len(res.runs) > 1:
        from .report import write_table

        res.table = write_table(rows=[table_row(r) for r in res.runs], folder=out, name=f"summary-{ds}")
    return res


def generate_responses(*, output: str | os.PathLike, options: EvalOptions = EvalOptions(), **kw: Any) -> EvalResult:
    """`evaluate` without scoring (same inputs and resumable outputs): responses, token ids and finish
    reasons in samples.jsonl, token statistics in summary.json; e.g. to build MixChain-style data."""
    return evaluate(output=output, options=replace(options, score=False), **kw)


def _mode(model, base, delta, reasoner, alphas, checkpoints, loras) -> str:
    if checkpoints:
        if model or base or delta or reasoner or loras:
            raise OptionsError("checkpoints are evaluated on their own", fix="pass only the checkpoint folders")
        return "checkpoints"
    if loras:
        if model is None:
            raise OptionsError("LoRA adapters need the model they were trained on", fix="pass --model")
        if alphas and len(alphas) != len(loras):
            raise OptionsError(f"{len(alphas)} α labels for {len(loras)} adapters", where="--alpha",
                               fix="give one α per --lora, or none")
        return "loras"
    if model is not None:
        if base or delta or reasoner or alphas:
            raise OptionsError("a model and a sweep were both given", fix="pass --model, or --base with --alpha")
        return "model"
    if base is None or (delta is None) == (reasoner is None) or not alphas:
        raise OptionsError("nothing to evaluate", fix="pass a model, or --base with --delta|--reasoner and "
                                                     "--alpha, or checkpoint folders")
    return "sweep"


def _lora_rank(path) -> int:
    f = Path(path) / "adapter_config.json"
    try:
        return int(json.loads(f.read_text())["r"])
    except (OSError, KeyError, ValueError, TypeError):
        raise OptionsError("not a PEFT LoRA adapter folder (no adapter_config.json with r)", where=str(path),
                           fix="save the adapter with peft's save_pretrained") from None


def _params(o: EvalOptions, path) -> tuple[float, str]:
    return (o.params_b, "nominal") if o.params_b else (count_params_b(path), "counted")


def _same_model(a, b) -> bool:
    """Same config.json (dtype and name aside) and tokenizer/chat-template files: swap in place."""
    pa, pb = Checkpoint.open(a), Checkpoint.open(b)
    fa, fb = pa.side_files(), pb.side_files()
    ca, cb = pa.config(), pb.config()
    for c in (ca, cb):
        for k in ("torch_dtype", "dtype", "_name_or_path", "transformers_version"):
            c.pop(k, None)
    keep = [k for k in set(fa) | set(fb) if k.startswith(("tokenizer", "special_tokens", "chat_template", "vocab",
                                                             "merges", "added_tokens"))]
    return ca == cb and all(fa.get(k) == fb.get(k) for k in keep)


def _alpha_of(path) -> float | None:
    f = Path(path) / "tvtool.json"
    try:
        return float(json.loads(f.read_text())["settings"]["alpha"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def _safe(name: str) -> str:
    return name.replace("/", "-").replace("\\", "-").removesuffix(".jsonl").removesuffix(".xml")
