"""`build_mixchain`: MixChain-Z datasets (CoT-Valve §3.2, §4.2, A.3, Table 9) from one α sweep.

For every question of a set with gold answers (GSM8K train by default):
  solution_0  the ground-truth solution (GSM8K: `<<…>>` annotations and the `#### N` line removed);
  solution_k  the greedy chain of θ1 + α_k·Δ, for the α values sorted ascending (default 0.2 0.4
              0.6 0.8), so solution_1 is usually the shortest chain and solution_K the longest.
Generation is `tvtool.evaluation.evaluate`'s α sweep: ONE vLLM engine, weights swapped in place per α,
samples appended to `<work>/alpha-<a>/<dataset>/samples.jsonl` (default work folder
`<output>.generations`). An interrupted build resumes there, per α and per question; the
dataset folder itself is written to `<output>.partial/` and renamed into place when complete.

Filtering, as in the released data ("we filter out all the solutions with incorrect answers"):
  correct_k   solution k reached the gold answer AND finished within max_tokens (a truncated chain
              counts as not correct unless `keep_truncated`);
  a solution that is not correct is left out: solution_k, solution_k_token and beta_k are None
              (correct_k False, alpha_k still given) — so `solution_k is None ⇔ not correct_k`;
  a question is kept when at least `min_correct` of its K generated solutions are correct
              ("all", the default, as in the released MixChain-Z-GSM8K: 6863 of 7473 questions;
              "any" = 1; or a number 0..K), and it has at least one solution at all.

β (eq. 4) per kept solution of a question, over ALL its kept solutions (solution_0 included):
  β = 1 − (m − m_min) / (m_max − m_min),  m = the solution's token length,
so the shortest solution gets β = 1 and the longest β = 0. Degenerate case (one solution, or
all of the same length): β = 1 for every one — each is a shortest solution, and β → 1 as
m → m_min is what eq. 4 gives the shortest one.
Token lengths are counted one way for every solution, as the paper counts generated tokens: the
token ids a model emits for it, the final EOS included. A generated solution counts its generated
token ids (as `evaluate` records them); solution_0 (and any text) counts its ids under the reasoner's
tokenizer (no special tokens) plus one for the EOS that would end it (`solution_length`).

max_tokens is clamped to the engine's context (--max-model-len, else the model's
max_position_embeddings) minus the longest prompt, with a note, before the engine starts.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from tvtool._version import __version__
from tvtool.io.atomic import atomic_dir
from tvtool.io.cards import MIXCHAIN_RECORD as RECORD, dataset_card
from tvtool.evaluation.data import Problem, load_problems
from tvtool.engine.engine import Engine, write_shell_model
from tvtool.engine.options import EngineOptions, SamplingOptions, vllm_version
from tvtool.errors import DatasetError, OptionsError, OutputError
from tvtool.evaluation.cluster import evaluate_on_ray
from tvtool.evaluation.evaluate import evaluate
from tvtool.io.finished import RECORD_KEY, dataset_fingerprint, is_finished, stage_record
from tvtool.io.finite import check_alphas
from tvtool.io.layout import SAMPLES
from tvtool.io.lock import output_lock
from tvtool.merge.config import MergeConfig
from tvtool.merge.options import MergeOptions, operator_settings
from tvtool.valve.mixchain_length import betas, fit_context, solution_length
from tvtool.valve.options import MixChainOptions, parse_min_correct
from tvtool.io.writer import check_free
from tvtool.io.paths import check_output_apart
from tvtool.engine.prompting import PromptOptions, load_tokenizer
from tvtool.evaluation.results import read_samples
from tvtool.evaluation.runs import EvalOptions
from tvtool.vectors.source import DeltaSource
from tvtool.evaluation.units import RayOptions

DATA_FILE = "data/train-00000-of-00001.parquet"
JSONL_FILE = "mixchain.jsonl"  # no split word in the name: load_dataset reads only the parquet
LICENSES = {"gsm8k": "mit", "math500": "mit"}
SOURCES = {"gsm8k": ["openai/gsm8k"], "math500": ["HuggingFaceH4/MATH-500"]}

Scorer = Callable[[str, Problem], bool]  # (response, problem) -> correct


@dataclass(frozen=True)
class MixChainResult:
    folder: Path  # the dataset folder (README.md, data/*.parquet, mixchain.json)
    generations: Path  # the α sweep's samples (resumable)
    rows: int
    stats: dict
    engine_starts: int
    notes: tuple[str, ...] = field(default=())  # e.g. max_tokens clamped to the context

    def summary(self) -> str:
        s = self.stats
        lines = [f"note: {n}" for n in self.notes] + [f"MixChain: {self.rows} of {s['questions']} questions kept (min_correct={s['min_correct']}) "
                 f"→ {self.folder}", f"generations: {self.generations} (engine starts: {self.engine_starts})"]
        lines += [f"  {r['label']}: {r['samples']} solutions, mean {_f(r['mean_tokens'])} tokens" for r in s["table9"]]
        lines += [f"  α={a['alpha']:g}: accuracy {_f(a['accuracy'])} %, kept {a['kept']}, truncated {a['truncated']}"
                  for a in s["per_alpha"]]
        return "\n".join(lines)


# --- pure logic (no engine) ---------------------------------------------------------------


def columns(k: int) -> list[str]:
    """Column order: the released MixChain-Z columns first, then solution_0_token, alpha_k, beta_k, id."""
    return (["question", "answer", "target"] + [f"solution_{i}" for i in range(k + 1)]
            + [f"correct_{i}" for i in range(1, k + 1)] + [f"solution_{i}_token" for i in range(k + 1)]
            + [f"alpha_{i}" for i in range(1, k + 1)] + [f"beta_{i}" for i in range(k + 1)] + ["id"])


def features(k: int):
    """The `datasets` schema, explicit so that columns that are all None keep their types."""
    from datasets import Features, Value  # optional dependency (tvtool[eval])

    def kind(name: str) -> str:
        if name.startswith("correct_"):
            return "bool"
        if name.endswith("_token"):
            return "int64"
        return "float64" if name.startswith(("alpha_", "beta_")) else "string"

    return Features({c: Value(kind(c)) for c in columns(k)})


def assemble(*, problems: Sequence[Problem], alphas: Sequence[float], generations: Sequence[Mapping[str, dict]],
             count_tokens: Callable[[str], int], min_correct: int, keep_truncated: bool = False,
             scorer: Scorer | None = None) -> tuple[list[dict], dict]:
    """Rows and statistics from per-α generation records ({problem id: evaluate record}, one map per α).

    A record needs `response`, `num_tokens`, `finish_reason` and (without `scorer`) `correct`.
    """
    k = len(alphas)
    if len(generations) != k:
        raise OptionsError(f"{len(generations)} generation sets for {k} α values", where="assemble")
    rows, hist = [], [0] * (k + 1)
    dropped = {"too few correct": 0, "no solution": 0}
    per_alpha = [{"alpha": float(a), "generated": 0, "correct": 0, "truncated": 0, "kept": 0, "tokens": []}
                 for a in alphas]
    for p in problems:
        texts: list[str | None] = [p.solution or None]
        lengths: list[int | None] = [count_tokens(p.solution) if p.solution else None]
        for j, gen in enumerate(generations):
            rec = gen.get(p.id)
            if rec is None:
                raise OutputError(f"no generation for question {p.id} at α={alphas[j]:g}", where="the generations",
                                  fix="re-run the build to finish generating (it resumes)")
            right = scorer(rec["response"], p) if scorer else bool(rec.get("correct"))
            cut = rec["finish_reason"] == "length"
            st = per_alpha[j]
            st["generated"] += 1
            st["correct"] += right
            st["truncated"] += cut
            st["tokens"].append(rec["num_tokens"])
            ok = right and (keep_truncated or not cut)
            texts.append(rec["response"] if ok else None)
            lengths.append(int(rec["num_tokens"]) if ok else None)
        n_ok = sum(t is not None for t in texts[1:])
        hist[n_ok] += 1
        if n_ok < min_correct:
            dropped["too few correct"] += 1
            continue
        if all(t is None for t in texts):
            dropped["no solution"] += 1
            continue
        for j in range(k):
            per_alpha[j]["kept"] += texts[j + 1] is not None
        row = {"question": p.question, "answer": p.solution, "target": p.gold, "id": p.id}
        for i, (t, m, b) in enumerate(zip(texts, lengths, betas(lengths))):
            row |= {f"solution_{i}": t, f"solution_{i}_token": m, f"beta_{i}": b}
            if i:
                row |= {f"correct_{i}": t is not None, f"alpha_{i}": float(alphas[i - 1])}
        rows.append({c: row[c] for c in columns(k)})
    for st in per_alpha:
        toks = st.pop("tokens")
        st["accuracy"] = 100.0 * st["correct"] / st["generated"] if st["generated"] else None
        st["mean_tokens_generated"] = statistics.fmean(toks) if toks else None
    stats = {"questions": len(problems), "kept": len(rows), "min_correct": min_correct,
             "keep_truncated": keep_truncated, "dropped": dropped,
             "correct_histogram": {str(i): n for i, n in enumerate(hist)}, "per_alpha": per_alpha,
             "table9": table9(rows=rows, alphas=alphas)}
    return rows, stats


def table9(*, rows: Sequence[dict], alphas: Sequence[float]) -> list[dict]:
    """Per solution index: #samples present and their mean #tokens (the paper's Table 9)."""
    out = []
    for i in range(len(alphas) + 1):
        toks = [r[f"solution_{i}_token"] for r in rows if r[f"solution_{i}"] is not None]
        label = "0 (ground truth)" if i == 0 else f"{i} (α={alphas[i - 1]:g})"
        out.append({"index": i, "label": label, "alpha": None if i == 0 else float(alphas[i - 1]),
                    "samples": len(toks), "mean_tokens": statistics.fmean(toks) if toks else None})
    return out


# --- writing --------------------------------------------------------------------------------


def write_dataset(*, rows: Sequence[dict], k: int, folder: str | os.PathLike, card: str, record: dict,
                  jsonl: bool = True) -> Path:
    """parquet (+ jsonl), README.md and mixchain.json into `folder` (which must be empty or new)."""
    from datasets import Dataset  # optional dependency (tvtool[eval])

    out = Path(folder)
    ds = Dataset.from_list(list(rows), features=features(k))
    (out / DATA_FILE).parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(out / DATA_FILE))
    if jsonl:
        (out / JSONL_FILE).parent.mkdir(parents=True, exist_ok=True)
        ds.to_json(str(out / JSONL_FILE), lines=True, force_ascii=False)
    (out / "README.md").write_text(card, encoding="utf-8")
    (out / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return out


# --- the public verb ------------------------------------------------------------------------


def build_mixchain(*, source: DeltaSource, output: str | os.PathLike, options: MixChainOptions = MixChainOptions(),
                   prompt: PromptOptions = PromptOptions(), sampling: SamplingOptions = SamplingOptions(),
                   engine_options: EngineOptions = EngineOptions(), engine: Engine | None = None,
                   scorer: Scorer | None = None, executor: RayOptions | None = None,
                   merge: MergeOptions = MergeOptions()) -> MixChainResult:
    """Generate (resuming) one solution per question and α, filter, compute β, write the dataset folder.

    `source`: θ1 and Δ (`DeltaSource.build` from the source flags, `--vocab` included).
    `merge`: a merge operator over one or several task vectors (`--method`, `--vector`, …): solution_k is
    then the chain of θ1 + α_k·M, each α loaded as `evaluate` loads it (the same `MergeConfig`s).
    `engine`: reuse a running engine (not closed). `scorer(response, problem) -> bool` replaces
    tvtool.evaluation.scoring (e.g. a stricter verifier); by default `evaluate`'s scores are used.
    `executor`: generate on a Ray pool (one unit per α; tvtool.evaluation.cluster) instead of one engine.
    """
    o = options
    alphas = sorted(dict.fromkeys(float(a) for a in o.alphas))
    if not alphas:
        raise OptionsError("no α values", where="--alpha", fix="pass e.g. --alpha 0.2,0.4,0.6,0.8")
    min_correct = parse_min_correct(o.min_correct, k=len(alphas))
    if sampling.n != 1:
        raise OptionsError("MixChain takes one solution per question and α", where=f"n={sampling.n}",
                           fix="use n=1 (add α values for more solutions)")
    if source.base is None:
        raise OptionsError("MixChain needs the base model", fix="pass the base (θ1)")
    configs = merge.configs(alphas)  # one per α, sorted: plain θ1 + α·Δ without operators
    inputs = [source.base, source.delta, source.reasoner, *source.more]
    out = Path(output)
    work = Path(o.work_dir) if o.work_dir else out.with_name(out.name + ".generations")
    if work.resolve() == out.resolve() or out.resolve() in work.resolve().parents:
        raise OptionsError("the work folder cannot be inside the dataset folder", where=str(work),
                           fix="choose another --work-dir")
    check_alphas(alphas)
    check_output_apart(out, inputs)
    check_output_apart(work, inputs, flag="--work-dir")
    with output_lock(out):
        return _build(out=out, work=work, source=source, configs=configs, min_correct=min_correct, o=o, prompt=prompt,
                      sampling=sampling, engine_options=engine_options, engine=engine, scorer=scorer,
                      executor=executor)


def _build(*, out: Path, work: Path, source: DeltaSource, configs: list[MergeConfig], min_correct: int,
           o: MixChainOptions, prompt: PromptOptions, sampling: SamplingOptions, engine_options: EngineOptions,
           engine: Engine | None, scorer: Scorer | None, executor: RayOptions | None) -> MixChainResult:
    base, delta, reasoner = source.base, source.delta, source.reasoner
    alphas, op = [c.alpha for c in configs], operator_settings(configs[0], more=source.more)
    if not (out / RECORD).is_file():  # not a MixChain folder: refused before any input is read
        check_free(out, overwrite=o.overwrite, what="the MixChain dataset folder")
    problems = load_problems(dataset=o.dataset, split=o.split, limit=o.limit, seed=o.seed, kind=o.kind)
    finished = _finished_record(source=source, problems=problems, alphas=alphas, op=op, o=o, prompt=prompt,
                                sampling=sampling, engine_options=engine.options if engine is not None
                                else engine_options, scorer=scorer)
    if scorer is not None:  # a custom scorer has no fingerprint: the dataset is always rebuilt
        check_free(out, overwrite=o.overwrite, what="the MixChain dataset folder")
    elif is_finished(out, finished, overwrite=o.overwrite, what="mixchain", name=RECORD):
        stats = json.loads((out / RECORD).read_text())["stats"]
        return MixChainResult(out, work, stats["kept"], stats, 0)
    with tempfile.TemporaryDirectory(prefix="tvtool-tokenizer-") as shell:  # the merged model's tokenizer
        tok = load_tokenizer(write_shell_model(source=source, folder=shell))
        sampling, note = fit_context(problems=problems, tokenizer=tok, shell=shell, prompt=prompt, sampling=sampling,
                                     engine_options=engine.options if engine is not None else engine_options)
    if note:
        logging.getLogger("tvtool").warning("tvtool: note: %s", note)
    ev_options = EvalOptions(dataset=o.dataset, split=o.split, limit=o.limit, seed=o.seed, kind=o.kind,
                             batch_size=o.batch_size, overwrite=o.overwrite, progress=o.progress)
    if executor is not None:  # --- ray: the same α sweep on a pool of engines (tvtool.evaluation.cluster) ---
        ev = evaluate_on_ray(output=work, source=source, configs=configs, prompt=prompt, sampling=sampling,
                             engine_options=engine_options, options=ev_options, executor=executor,
                             progress=o.progress).results[0]
    else:
        ev = evaluate(output=work, source=source, configs=configs, prompt=prompt, sampling=sampling,
                      engine_options=engine_options, engine=engine, options=ev_options)
    if len(ev.runs) != len(alphas):
        raise OutputError("the α sweep returned another number of runs", where=str(work))
    gens = [{r["id"]: r for r in read_samples(run.folder / SAMPLES) if r["index"] == 0} for run in ev.runs]
    rows, stats = assemble(problems=problems, alphas=alphas, generations=gens, min_correct=min_correct,
                           count_tokens=lambda t: solution_length(text=t, tokenizer=tok),
                           keep_truncated=o.keep_truncated, scorer=scorer)
    if not rows:  # an empty MixChain-Z trains nothing; the generations stay in the work folder for a re-run
        why = ", ".join(f"{v} {k}" for k, v in stats["dropped"].items() if v) or "none generated"
        raise DatasetError(f"MixChain-Z would be empty: none of {len(problems)} questions kept ({why}; "
                           f"--min-correct {o.min_correct} of {len(alphas)} α)", where=str(out),
                           fix="lower --min-correct, raise --limit or --max-tokens (the generations in "
                               f"{work} are reused)")
    record = _record(base=base, delta=delta, reasoner=reasoner, alphas=alphas, op=op, problems=problems, o=o,
                     prompt=prompt, sampling=sampling, stats=stats, custom_scorer=scorer is not None)
    record[RECORD_KEY] = finished
    lic = o.license or LICENSES.get(problems.name, "other")
    card = dataset_card(stats=stats, record=record, license=lic, source_datasets=SOURCES.get(problems.name))
    with atomic_dir(out) as tmp:
        write_dataset(rows=rows, k=len(alphas), folder=tmp, card=card, record=record, jsonl=o.jsonl)
    return MixChainResult(out, work, len(rows), stats, ev.engine_starts, (note,) if note else ())


def mixchain_record(*, source: DeltaSource, options: MixChainOptions = MixChainOptions(),
                    prompt: PromptOptions = PromptOptions(), sampling: SamplingOptions = SamplingOptions(),
                    engine_options: EngineOptions = EngineOptions(), merge: MergeOptions = MergeOptions()) -> dict:
    """The finished-work record `build_mixchain` checks for these arguments (default scorer), with no engine
    and nothing written (`sweep --plan`); `engine_options`: those of the engine it would run on."""
    configs = merge.configs(sorted(dict.fromkeys(float(a) for a in options.alphas)))
    o = options
    problems = load_problems(dataset=o.dataset, split=o.split, limit=o.limit, seed=o.seed, kind=o.kind)
    return _finished_record(source=source, problems=problems, alphas=[c.alpha for c in configs],
                            op=operator_settings(configs[0], more=source.more), o=o, prompt=prompt, sampling=sampling,
                            engine_options=engine_options, scorer=None)


def _finished_record(*, source: DeltaSource, problems, alphas, op: dict | None, o: MixChainOptions,
                     prompt: PromptOptions, sampling: SamplingOptions, engine_options: EngineOptions, scorer) -> dict:
    """The finished-work record of the dataset folder (`tvtool.io.finished`): the options (the merge operator
    too, `op`), the sampling as asked (the context clamp follows from the inputs), the inputs' and dataset's
    content."""
    fp, keep = source.fingerprint_record(), ("limit", "seed", "min_correct", "keep_truncated", "license", "jsonl")
    return stage_record(stage="mixchain", inputs={**fp["inputs"], "dataset": dataset_fingerprint(
        problems.source, name=problems.name, kind=problems.kind, split=problems.split)}, options={
        **fp["options"], "alphas": alphas, **({"merge": op} if op else {}), **{k: getattr(o, k) for k in keep},
        "prompt": asdict(prompt),
        "sampling": asdict(sampling), "engine": {k: getattr(engine_options, k) for k in ("dtype", "max_model_len")},
        "scorer": "custom" if scorer is not None else "tvtool.scoring"})


def _record(*, base, delta, reasoner, alphas, op: dict | None, problems, o: MixChainOptions,
            prompt: PromptOptions, sampling: SamplingOptions, stats: dict, custom_scorer: bool) -> dict[str, Any]:
    return {"tvtool_version": __version__, "vllm_version": vllm_version(), "alphas": alphas, **({"merge": op} if op else {}),
            "models": {"base": str(base), "delta": str(delta) if delta else None,
                       "reasoner": str(reasoner) if reasoner else None},
            "dataset": {"name": problems.name, "kind": problems.kind, "split": problems.split,
                        "source": problems.source, "n": len(problems), "limit": o.limit, "seed": o.seed,
                        "description": problems.description},
            "min_correct": stats["min_correct"], "keep_truncated": o.keep_truncated,
            "scorer": "custom" if custom_scorer else "tvtool.scoring",
            "sampling": {**asdict(sampling), "greedy": sampling.temperature == 0},
            "prompt": asdict(prompt), "stats": stats}


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"
