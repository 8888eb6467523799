"""One evaluation run: generate with the engine's current weights (resuming), score, summarise.

A run folder holds samples.jsonl (appended and fsynced batch by batch), summary.json and
run.json (`settings` and the finished-work `record` first, `finished` last; `load`: how the engine got
the weights, `Engine.load_alpha`'s record: information, not identity). A run is complete
when run.json holds the same record fingerprint (`run_record`: sampling (with its protocol), prompt,
scoring, engine dtype/max_model_len, the weights' and the dataset file's content, `tvtool.io.finished`)
and every sample is written. Another record is refused (or, with overwrite, discarded, saying what
changed); samples already written are not generated again. How answers are read (answer rule,
thinking delimiter, difficulty field) is not in the record: a change re-reads the samples.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from tvtool._version import __version__
from tvtool.evaluation.answers import read_sample, reread_file
from tvtool.io.atomic import write_json, write_text
from tvtool.evaluation.data import ProblemSet
from tvtool.engine.options import EngineLike, SamplingOptions, vllm_version
from tvtool.errors import OutputError
from tvtool.io.finished import RECORD_KEY, changes, dataset_fingerprint, read_record, say, stage_record
from tvtool.io.fingerprint import input_fingerprint
from tvtool.io.layout import RUN, SAMPLES, SHARDS, SUMMARY
from tvtool.engine.logs import RunProgress
from tvtool.options import opt
from tvtool.engine.prompting import PromptOptions, uses_chat_template
from tvtool.evaluation.difficulty import resolve_field
from tvtool.evaluation.options import AUTO, NONE, AnswerOptions
from tvtool.evaluation.results import count_params_b, read_samples, summary_of
from tvtool.evaluation.thinking import ThinkReader, detect_think_end


@dataclass(frozen=True)
class EvalOptions(AnswerOptions):  # + think_end, difficulty_field (shared with the recipe's `eval:`)
    dataset: str = opt("gsm8k", "gsm8k | math500 | toy, a .jsonl/.xml path (ASDiv.xml), or a Hub id.")
    split: str = opt("test", "Dataset split.")
    limit: int | None = opt(None, "Evaluate only this many problems (the first N, or N random with --seed).")
    seed: int | None = opt(None, "Shuffle problems with this seed before --limit.")
    kind: str | None = opt(None, "Answer format of a file dataset: gsm8k | math500 | asdiv (default: detected).")
    batch_size: int = opt(64, "Problems per generation batch; results are saved after each batch.")
    params_b: float | None = opt(None, "Nominal model size in billions for ACU (default: counted from weights).")
    include: str | None = opt(None, "α sweep: apply α only to tensors whose name matches this regex; others stay "
                                    "at the base (e.g. 'mlp' for an MLP-only Δ).")
    exclude: str | None = opt(None, "α sweep: do not apply α to tensors whose name matches this regex.")
    apply: Literal["swap", "lora"] = opt(
        "swap", "α sweep: swap loads θ1 + α·Δ in place, one α at a time (rounded to the checkpoint dtype, as "
                "materialize writes it); lora serves a LoRA or factored Δ (--delta) as one α-scaled adapter per α "
                "(B·A applied in the engine dtype) and sends every α's requests in one generate call.")
    score: bool = opt(True, "Score the responses (off: generation only).")
    overwrite: bool = opt(False, "Discard existing results made with other settings.")
    progress: bool = opt(True, "Show a progress bar.")
    answer_rule: Literal["paper", "boxed-only", "strict-match", "flexible-extract"] = opt(
        "paper", "paper: last complete \\boxed{}, else the last number (CoT-Valve A.1); boxed-only; or the "
                 "lm-eval-harness GSM8K filters strict-match (#### N) / flexible-extract (last number).")
    prompt_budgets: tuple[int, ...] = opt((), "Also evaluate token-budget prompts (Table 12 baseline), e.g. "
                                              "20,50,100: one run per budget at --budget-alpha.", flag="--prompt-budget")
    budget_template: Literal["qwq", "llama"] = opt("qwq", "Budget prompt of the paper's appendix: qwq or llama.")
    budget_alpha: float = opt(1.0, "α of the budget-prompt runs in an α sweep (1: the reasoner θ2).")
    verbose: bool = opt(False, "Show vLLM's own logs (default: written to <output>/vllm.log).")


def run_one(*, engine: EngineLike, problems: ProblemSet, folder: str | os.PathLike, model: dict,
            prompt: PromptOptions = PromptOptions(), sampling: SamplingOptions = SamplingOptions(),
            options: EvalOptions = EvalOptions(), lora: str | os.PathLike | None = None,
            params_b: float | None = None, params_source: str = "counted", weights: dict | None = None,
            load: dict | None = None) -> dict:
    """Generate (resuming), score and summarise `problems` with the engine's current weights.

    `weights`: the content fingerprint of those weights (see `run_record`); default: `model` as given.
    `load`: how they were loaded (`Engine.load_alpha`'s record), kept in run.json next to the record
    (None: the load already recorded there for the same record, if any)."""
    run = open_run(engine=engine, problems=problems, folder=folder, model=model, prompt=prompt, sampling=sampling,
                   options=options, lora=lora, params_b=params_b, params_source=params_source, weights=weights,
                   load=load)
    with RunProgress(desc=run.desc, total=run.total, done=run.total - len(run.todo) * sampling.n,
                     disable=not options.progress, records=read_samples(run.path)) as bar, \
            open(run.path, "a", encoding="utf-8") as f:
        for start in range(0, len(run.todo), options.batch_size):
            batch = run.todo[start:start + options.batch_size]
            texts = engine.prompts(questions=[p.question for p in batch], options=prompt)
            outs = engine.generate(prompts=texts, sampling=sampling, lora=lora, add_special_tokens=run.special)
            bar.update(run.write(f, batch, texts, outs), n=len(batch) * sampling.n)
    return run.finish()


@dataclass
class OpenRun:
    """A run whose run.json is written and whose samples are being generated (`open_run`): what is still to
    do, how to append samples, and `finish` (score, summarise, mark finished). `run_one` drives one; a
    batched caller (`tvtool.evaluation.batched`) drives several runs with one generate call per batch."""

    folder: Path
    problems: ProblemSet
    sampling: SamplingOptions
    options: EvalOptions
    lora: str | None
    run: dict  # run.json as written at the start
    todo: list  # problems with samples still missing
    done: set  # (id, sampling index) already written
    special: bool  # add_special_tokens when tokenizing (no chat template)
    params: tuple[float | None, str]
    reader: ThinkReader  # splits thinking from the answer (`tvtool.evaluation.thinking`)
    tokenizer: Any

    @property
    def path(self) -> Path:
        return self.folder / SAMPLES

    @property
    def total(self) -> int:
        return len(self.problems) * self.sampling.n

    @property
    def desc(self) -> str:
        return f"{self.folder.parent.name} {self.folder.name}"

    def write(self, f, batch, texts, outs) -> list[dict]:
        """Append the records of `batch` (prompts `texts`, samples `outs`) to samples.jsonl, flushed and fsynced."""
        o = self.options
        recs = [_record(p, text, s, self.problems.kind, o.score and o.answer_rule, self.reader)
                for p, text, samples in zip(batch, texts, outs) for s in samples if (p.id, s.index) not in self.done]
        f.write("".join(json.dumps(r) + "\n" for r in recs))
        f.flush()
        os.fsync(f.fileno())
        return recs

    def finish(self) -> dict:
        """`finish_run`: read the answers, summarise, mark finished."""
        return finish_run(folder=self.folder, run=self.run, problems=self.problems, sampling=self.sampling,
                          options=self.options, params_b=self.params[0], params_source=self.params[1],
                          tokenizer=self.tokenizer)


def open_run(*, engine: EngineLike, problems: ProblemSet, folder: str | os.PathLike, model: dict,
             prompt: PromptOptions, sampling: SamplingOptions, options: EvalOptions,
             lora: str | os.PathLike | None = None, params_b: float | None = None, params_source: str = "counted",
             weights: dict | None = None, load: dict | None = None) -> OpenRun:
    """Start (or resume) a run: check the folder's record, write run.json, gather the samples already there
    (shards a pool of engines wrote included, `merge_shards`)."""
    folder = Path(folder)
    settings = run_settings(engine=engine, problems=problems, model=model, lora=lora, prompt=prompt,
                            sampling=sampling, options=options)
    record = run_record(engine=engine, problems=problems, model=model, lora=lora, prompt=prompt, sampling=sampling,
                        options=options, weights=weights)
    run = begin_run(folder=folder, settings=settings, record=record, problems=problems, options=options,
                    engine_options=engine.options, load=load)
    merge_shards(folder, problems, sampling.n)
    done = {(r["id"], r["index"]) for r in read_samples(folder / SAMPLES, repair=True)}
    todo = [p for p in problems if any((p.id, i) not in done for i in range(sampling.n))]
    special = not uses_chat_template(tokenizer=engine.tokenizer, options=prompt)
    return OpenRun(folder, problems, sampling, options, str(lora) if lora else None, run, todo, done, special,
                   (params_b, params_source), think_reader(engine.tokenizer, options), engine.tokenizer)


def think_reader(tokenizer, options: EvalOptions) -> ThinkReader:
    """How a run's responses are split into thinking and answer (`tvtool.evaluation.thinking`)."""
    return ThinkReader(detect_think_end(option=options.think_end, tokenizer=tokenizer)[0], tokenizer=tokenizer)


def begin_run(*, folder: Path, settings: dict, record: dict, problems: ProblemSet, options: EvalOptions,
              engine_options, load: dict | None = None) -> dict:
    """Check the folder holds nothing of other settings and write run.json's first form (no `finished`)."""
    folder.mkdir(parents=True, exist_ok=True)
    check_settings(folder, record, options.overwrite)
    load = load if load is not None else _recorded_load(folder / RUN, record)
    run = {"settings": settings, RECORD_KEY: record, **({"load": load} if load is not None else {}),
           "dataset": _dataset_record(problems),
           "tvtool_version": __version__, "scoring": {"answer_rule": options.answer_rule if options.score else None},
           "vllm_version": vllm_version(),
           "engine": asdict(engine_options), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(folder / RUN, run)
    return run


def generate_samples(*, engine: EngineLike, problems: ProblemSet | Sequence, path: Path, prompt: PromptOptions,
                     sampling: SamplingOptions, options: EvalOptions, lora=None, done: set | None = None,
                     kind: str | None = None, desc: str = "") -> None:
    """Append the samples of `problems` not written yet (in `path`, or in `done`) to `path`, batch by batch
    (each batch flushed and fsynced), in problem order: a shard of a run (`tvtool.evaluation.shards`)."""
    kind = kind or problems.kind
    reader = think_reader(engine.tokenizer, options)
    done = (done or set()) | {(r["id"], r["index"]) for r in read_samples(path, repair=True)}
    todo = [p for p in problems if any((p.id, i) not in done for i in range(sampling.n))]
    special = not uses_chat_template(tokenizer=engine.tokenizer, options=prompt)
    total = len(problems) * sampling.n
    with RunProgress(desc=desc, total=total, done=total - len(todo) * sampling.n, disable=not options.progress,
                     records=read_samples(path)) as bar, open(path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), options.batch_size):
            batch = todo[start:start + options.batch_size]
            texts = engine.prompts(questions=[p.question for p in batch], options=prompt)
            outs = engine.generate(prompts=texts, sampling=sampling, lora=lora, add_special_tokens=special)
            recs = [_record(p, text, s, kind, options.score and options.answer_rule, reader)
                    for p, text, samples in zip(batch, texts, outs) for s in samples if (p.id, s.index) not in done]
            f.write("".join(json.dumps(r) + "\n" for r in recs))
            f.flush()
            os.fsync(f.fileno())
            bar.update(recs, n=len(batch) * sampling.n)


def merge_shards(folder: Path, problems: ProblemSet, n: int) -> None:
    """samples.jsonl ← its samples and those of the run's shard files (tvtool.evaluation.shards), in the order
    one engine writes them (problems in order, samples by index), atomically; then the shard files go."""
    shards = sorted((folder / SHARDS).glob("*.jsonl"))
    if not shards:
        return
    by_key: dict[tuple[str, int], dict] = {}
    for f in [folder / SAMPLES, *shards]:
        for r in read_samples(f, repair=True):
            by_key.setdefault((r["id"], r["index"]), r)
    order = [(p.id, i) for p in problems for i in range(n)]
    write_text(folder / SAMPLES, "".join(json.dumps(by_key[k]) + "\n" for k in order if k in by_key))
    shutil.rmtree(folder / SHARDS)


def finish_run(*, folder: Path, run: dict, problems: ProblemSet, sampling: SamplingOptions, options: EvalOptions,
               params_b: float | None, params_source: str, tokenizer) -> dict:
    """Read the answers (again, under the current answer rule and thinking delimiter), write summary.json,
    and run.json with `finished`, last."""
    scoring = read_run(folder=folder, problems=problems, options=options, tokenizer=tokenizer)
    summary = summary_of(folder=folder, problems=problems, n=sampling.n, params_b=params_b,
                         params_source=params_source, difficulty=options.difficulty_field)
    write_json(folder / SUMMARY, summary)
    run["scoring"] = {**run["scoring"], **scoring, "difficulty_field": summary.get("difficulty_field")}
    write_json(folder / RUN, {**run, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return summary


def read_run(*, folder: str | os.PathLike, problems: ProblemSet, options: EvalOptions, tokenizer) -> dict:
    """Read (again) the samples of a run with `options`' answer rule and thinking delimiter (`auto`: from
    the chat template of `tokenizer`, else from the outputs); records read another way are read again,
    never generated again. Returns what run.json records: {think_end, think_end_from}."""
    path = Path(folder) / SAMPLES
    think_end, how = detect_think_end(option=options.think_end, tokenizer=tokenizer)
    if how == "not found":  # auto, and the chat template does not say: do the outputs close a thinking block?
        think_end, how = detect_think_end(option=AUTO, responses=(r.get("response") or "" for r in read_samples(path)))
    reread_file(path, kind=problems.kind, rule=options.score and options.answer_rule,
                reader=ThinkReader(think_end, tokenizer=tokenizer))
    return {"think_end": think_end, "think_end_from": how}


def run_settings(*, engine: EngineLike | None, problems: ProblemSet, model: dict, lora, prompt: PromptOptions,
                 sampling: SamplingOptions, options: EvalOptions, sampling_record: dict | None = None) -> dict:
    """What a run's results depend on (run.json `settings`); other settings in the folder are refused.

    `sampling_record` replaces `engine.sampling_record(sampling)` for a planner that has no engine yet
    (tvtool.evaluation.units, via `tvtool.engine.engine.sampling_record` on the same model folder)."""
    record = sampling_record if sampling_record is not None else engine.sampling_record(sampling)
    return {"model": model, "lora": str(lora) if lora else None, "prompt": asdict(prompt),
            "sampling": record, "score": options.score,
            "dataset": {k: getattr(problems, k) for k in ("name", "kind", "source", "split")}}


def run_record(*, engine: EngineLike | None, problems: ProblemSet, model: dict, lora, prompt: PromptOptions,
               sampling: SamplingOptions, options: EvalOptions, weights: dict | None = None,
               sampling_record: dict | None = None, engine_options=None) -> dict:
    """The finished-work record of a run: what its samples depend on, inputs by content, never by path.

    `weights` fingerprints the model (`DeltaSource.fingerprint_record()` + the merge, or a folder's
    `input_fingerprint`); `model`'s non-path entries (α, include/exclude, label) are options. The
    answer rule is not in it: a changed rule re-scores the samples (`answers.rescore_file`), it does
    not generate them again. A planner with no engine yet (tvtool.evaluation.units) passes `sampling_record`
    and `engine_options`."""

    paths = ("path", "base", "delta", "reasoner")
    weights = weights if weights is not None else {"model": {k: model.get(k) for k in paths if model.get(k)}}
    merge = {**weights["source"]["options"], **weights["merge"]} if "source" in weights else {}
    inputs = {**(weights["source"]["inputs"] if "source" in weights else weights),  # base, delta|reasoner | folder
              "dataset": dataset_fingerprint(problems.source, name=problems.name, kind=problems.kind,
                                             split=problems.split)}
    if lora:
        inputs["lora"] = input_fingerprint(lora)
    opts = {**merge, "model": {k: v for k, v in model.items() if k not in paths and k not in merge},
            "prompt": asdict(prompt), "score": options.score,
            "sampling": sampling_record if sampling_record is not None else engine.sampling_record(sampling),
            "engine": {k: getattr(engine_options or engine.options, k) for k in ("dtype", "max_model_len")}}
    return stage_record(stage="eval", options=opts, inputs=inputs)


def is_complete(*, folder: str | os.PathLike, record: dict, problems: ProblemSet, n: int) -> bool:
    """True when `folder` holds every sample of `problems` made with `record` (nothing to generate)."""
    folder = Path(folder)
    old = read_record(folder / RUN)
    if old is None or old["fingerprint"] != record["fingerprint"]:
        return False
    done = {(r["id"], r["index"]) for r in read_samples(folder / SAMPLES)}
    return all((p.id, i) in done for p in problems for i in range(n))


def _recorded_load(path: Path, record: dict) -> dict | None:
    """The `load` run.json holds for the same record (a re-summarised run keeps how its weights were loaded)."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    same = isinstance(old, dict) and (old.get(RECORD_KEY) or {}).get("fingerprint") == record["fingerprint"]
    return old.get("load") if same else None


def _record(p, prompt: str, s, kind: str, rule: str | None, reader: ThinkReader) -> dict:
    rec = {"id": p.id, "index": s.index, "prompt": prompt, "response": s.text, "token_ids": list(s.token_ids),
           "num_tokens": len(s.token_ids), "gold": p.gold, "finish_reason": s.finish_reason,
           "extracted": None, "correct": None}
    read_sample(rec, kind=kind, rule=rule, reader=reader)
    for k in ("subject", "level"):
        if k in p.meta:
            rec[k] = p.meta[k]
    return rec


def _dataset_record(ps: ProblemSet) -> dict:
    return {"name": ps.name, "kind": ps.kind, "source": ps.source, "split": ps.split, "n": len(ps),
            "description": ps.description, "excluded": ps.excluded}


def check_settings(folder: Path, record: dict, overwrite: bool) -> None:
    """Refuse a folder holding results made with another record; with `overwrite`, discard them (one line
    says what changed)."""
    f = folder / RUN
    if not f.is_file() and not (folder / SAMPLES).is_file():
        return
    old = read_record(f)
    if old is not None and old["fingerprint"] == record["fingerprint"]:
        return
    if not overwrite:
        raise OutputError(f"the output folder holds results made with other settings or inputs "
                          f"({changes(old, record)})", where=str(folder),
                          fix="pass --overwrite to discard them, or choose another output folder")
    say(f"{changes(old, record)}: redoing eval {folder.parent.name}/{folder.name}")
    for name in (SAMPLES, SUMMARY, RUN):
        (folder / name).unlink(missing_ok=True)


def check_reading(options: EvalOptions, problems: ProblemSet) -> None:
    """Refuse, before any engine starts, a thinking delimiter or difficulty field that cannot be used."""
    ThinkReader(None if options.think_end in (AUTO, NONE) else options.think_end)  # an empty tag is refused
    resolve_field(options.difficulty_field, problems=problems)


def run_params(o: EvalOptions, path) -> tuple[float, str]:
    """(params_b, "nominal" | "counted") that a run's ACU uses: the option, else counted from `path`."""
    return (o.params_b, "nominal") if o.params_b else (count_params_b(path), "counted")
