"""Evaluation runs with a real vLLM CPU engine: files, invariants, resume, α sweep, LoRA list, tables."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from engine_setup import ALPHA, Crash as _Crash, Flaky as _Flaky

from tvtool.engine.options import EngineOptions, SamplingOptions
from tvtool.evaluation.evaluate import evaluate
from tvtool.engine.prompting import PromptOptions
from tvtool.evaluation.results import ACU_FORMULA, count_params_b, read_samples, summarize
from tvtool.evaluation.runs import EvalOptions, run_one
from tvtool.vectors.source import DeltaSource

FIXTURE_ASDIV = Path(__file__).parents[1] / "fixtures" / "asdiv_sample.xml"
SAMPLING = SamplingOptions(max_tokens=16)


def _load(folder: Path):
    samples = read_samples(folder / "samples.jsonl")
    return samples, json.loads((folder / "summary.json").read_text()), json.loads((folder / "run.json").read_text())


# --- pure parts -------------------------------------------------------------------------


def test_acu_in_paper_units():
    # QwQ-32B-Preview on GSM8K, CoT-Valve Table 1: 95.1 % at 741.1 tokens -> ACU 0.40
    recs = [{"id": str(i), "index": 0, "num_tokens": 741.1, "correct": i < 951, "finish_reason": "stop"}
            for i in range(1000)]
    s = summarize(records=recs, params_b=32)
    assert s["accuracy"] == pytest.approx(95.1) and round(s["acu"], 2) == 0.40
    assert s["acu_formula"] == ACU_FORMULA


def test_read_samples_drops_a_torn_last_line(tmp_path):
    f = tmp_path / "samples.jsonl"
    f.write_text('{"id": "a", "index": 0}\n{"id": "b", "ind')
    assert [r["id"] for r in read_samples(f)] == ["a"]
    read_samples(f, repair=True)
    assert f.read_text() == '{"id": "a", "index": 0}\n'


class _Scripted:
    """A stand-in engine (no vLLM) answering problem k correctly when k is even; sample 1 is cut off."""

    options = EngineOptions()
    tokenizer = None

    def __init__(self, problems):
        self.gold = {p.question: p.gold for p in problems}
        self.order = [p.question for p in problems]

    def sampling_record(self, sampling):
        return {"max_tokens": sampling.max_tokens, "n": sampling.n}

    def prompts(self, *, questions, options):
        return list(questions)

    def generate(self, *, prompts, sampling, lora=None, add_special_tokens=True):
        from tvtool.engine.options import Sample

        out = []
        for q in prompts:
            k = self.order.index(q)
            text = f"so the answer is \\boxed{{{self.gold[q] if k % 2 == 0 else 'x'}}}"
            out.append([Sample(index=i, token_ids=tuple(range(3 + k + i)), text=text,
                               finish_reason="length" if i == 1 else "stop") for i in range(sampling.n)])
        return out


def test_summary_from_scored_samples(tmp_path):
    from tvtool.evaluation.data import load_problems

    probs = load_problems(dataset="gsm8k", limit=5)
    s = run_one(engine=_Scripted(probs), problems=probs, folder=tmp_path, model={"path": "m"},
                sampling=SamplingOptions(n=2, max_tokens=8), options=EvalOptions(batch_size=2, progress=False),
                params_b=2.0)
    samples = read_samples(tmp_path / "samples.jsonl")
    assert len(samples) == 10 and {r["index"] for r in samples} == {0, 1}
    assert [r["correct"] for r in samples] == [k % 2 == 0 for k in range(5) for _ in range(2)]
    assert s["accuracy"] == pytest.approx(60.0) and s["truncated"] == 5 and s["n_problems"] == 5
    assert s["mean_tokens"] == pytest.approx(statistics.fmean(3 + k + i for k in range(5) for i in range(2)))
    assert s["acu"] == pytest.approx(60.0 / (2.0 * s["mean_tokens"]) * 100)


# --- real runs ------------------------------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.parametrize("dataset,kind", [("gsm8k", "gsm8k"), ("math500", "math500"),
                                          (str(FIXTURE_ASDIV), "asdiv")])
def test_run_files_and_invariants(vengine, tmp_path, dataset, kind):
    out = tmp_path / "run"
    res = evaluate(model=vengine.materialized, output=out, engine=vengine.engine, sampling=SAMPLING,
                   options=EvalOptions(dataset=dataset, limit=3, batch_size=2, progress=False))
    samples, summary, run = _load(out)
    assert len(samples) == 3 and len({(r["id"], r["index"]) for r in samples}) == 3
    for r in samples:
        assert r["num_tokens"] == len(r["token_ids"]) <= SAMPLING.max_tokens
        assert r["finish_reason"] in ("stop", "length") and isinstance(r["correct"], bool)
        assert r["prompt"].endswith(" step")  # the reasoner's chat template, carried by materialize
    acc = 100 * sum(r["correct"] for r in samples) / len(samples)
    assert summary["accuracy"] == pytest.approx(acc)
    assert summary["mean_tokens"] == pytest.approx(statistics.fmean(r["num_tokens"] for r in samples))
    assert summary["truncated"] == sum(r["finish_reason"] == "length" for r in samples)
    assert summary["params_b"] == pytest.approx(count_params_b(vengine.materialized))
    assert summary["acu"] == pytest.approx(acc / (summary["params_b"] * summary["mean_tokens"]) * 100)
    assert run["settings"]["sampling"]["max_tokens"] == 16 and run["settings"]["sampling"]["temperature"] == 0.0
    assert run["settings"]["dataset"]["kind"] == kind and run["dataset"]["n"] == 3 and run["dataset"]["description"]
    assert run["vllm_version"] and run["tvtool_version"] and "finished" in run
    if kind == "math500":
        subj = summary["by_subject"]
        assert sum(v["n_samples"] for v in subj.values()) == 3 and all(r["subject"] in subj for r in samples)
    assert res.runs[0].summary == summary


@pytest.mark.vllm
def test_killed_run_resumes_to_the_same_summary(vengine, tmp_path):
    from tvtool.evaluation.data import load_problems

    e = vengine.engine
    e.load_weights(path=vengine.materialized)
    probs = load_problems(dataset="gsm8k", limit=5)
    opts = EvalOptions(batch_size=2, progress=False)
    kw = dict(problems=probs, model={"path": "m"}, sampling=SAMPLING, options=opts, params_b=1.0)
    full = tmp_path / "full"
    ref = run_one(engine=e, folder=full, **kw)
    part = tmp_path / "part"
    with pytest.raises(_Crash):
        run_one(engine=_Flaky(e, ok=1), folder=part, **kw)
    assert len(read_samples(part / "samples.jsonl")) == 2 and not (part / "summary.json").exists()
    with open(part / "samples.jsonl", "a") as f:  # a kill in the middle of a write
        f.write('{"id": "gsm8k/test/2", "index": 0, "resp')
    again = _Flaky(e, ok=99)
    summary = run_one(engine=again, folder=part, **kw)
    assert again.prompts_seen == 3  # only the missing problems were generated
    samples = read_samples(part / "samples.jsonl")
    assert [r["id"] for r in samples] == [p.id for p in probs]  # nothing lost, nothing duplicated
    assert summary == ref == json.loads((part / "summary.json").read_text())
    assert samples == read_samples(full / "samples.jsonl")
    # a finished run re-run generates nothing
    idle = _Flaky(e, ok=0)
    assert run_one(engine=idle, folder=part, **kw) == ref
    # a larger --limit continues the same run: only the new problems are generated
    more = _Flaky(e, ok=99)
    bigger = run_one(engine=more, folder=part, **{**kw, "problems": load_problems(dataset="gsm8k", limit=7)})
    assert more.prompts_seen == 2 and bigger["n_samples"] == 7


@pytest.mark.vllm
def test_other_settings_in_the_same_folder_are_refused(vengine, tmp_path):
    from tvtool.evaluation.data import load_problems
    from tvtool.errors import OutputError

    probs = load_problems(dataset="gsm8k", limit=1)
    kw = dict(engine=vengine.engine, problems=probs, folder=tmp_path, model={"path": "m"},
              options=EvalOptions(progress=False))
    run_one(sampling=SamplingOptions(max_tokens=4), **kw)
    with pytest.raises(OutputError):
        run_one(sampling=SamplingOptions(max_tokens=5), **kw)


def _check_table(res, out: Path, name: str):
    rows = json.loads((out / f"{name}.json").read_text())["rows"]
    assert (out / f"{name}.png").stat().st_size > 1000 and (out / f"{name}.md").is_file()
    assert len(rows) == len(res.runs)
    for row, run in zip(rows, res.runs):
        samples = read_samples(run.folder / "samples.jsonl")
        assert row["accuracy"] == pytest.approx(100 * sum(r["correct"] for r in samples) / len(samples))
        assert row["mean_tokens"] == pytest.approx(statistics.fmean(r["num_tokens"] for r in samples))
        assert row["truncated"] == sum(r["finish_reason"] == "length" for r in samples)
        assert row["n_samples"] == len(samples)
        assert row["acu"] == pytest.approx(run.summary["acu"])
    md = (out / f"{name}.md").read_text()
    table = md.split("\n\n")[0]  # the per-run table; per-level tables (GSM8K's steps proxy) follow the formula
    assert sum(line.startswith("| ") for line in table.splitlines()) == len(rows) + 1 and ACU_FORMULA in md
    return rows


@pytest.mark.vllm
def test_alpha_sweep_in_one_engine(vengine, tmp_path):
    opts = EvalOptions(limit=3, batch_size=8, progress=False, params_b=32)
    out = tmp_path / "sweep"
    res = evaluate(source=DeltaSource(base=vengine.base, reasoner=vengine.reasoner), alphas=(0, ALPHA, 1), output=out,
                   engine=vengine.engine, sampling=SAMPLING, options=opts)
    assert res.engine_starts == 0 and [r.alpha for r in res.runs] == [0.0, ALPHA, 1.0]
    for a in ("0", "0.5", "1"):
        assert (out / f"alpha-{a}" / "gsm8k" / "summary.json").is_file()
    rows = _check_table(res, out, "summary-gsm8k")
    assert [r["alpha"] for r in rows] == [0.0, ALPHA, 1.0]
    # the in-place α=0.5 run equals a run of the materialized checkpoint (a fresh model folder)
    ref = evaluate(model=vengine.materialized, output=tmp_path / "mat", engine=vengine.engine, sampling=SAMPLING,
                   options=opts)
    sweep = read_samples(out / "alpha-0.5" / "gsm8k" / "samples.jsonl")
    assert [r["token_ids"] for r in sweep] == [r["token_ids"] for r in read_samples(tmp_path / "mat" / "samples.jsonl")]
    assert res.runs[1].summary == ref.runs[0].summary
    # a re-run resumes every α: nothing new is generated, same table
    again = evaluate(source=DeltaSource(base=vengine.base, reasoner=vengine.reasoner), alphas=(0, ALPHA, 1), output=out,
                     engine=vengine.engine, sampling=SAMPLING, options=opts)
    assert [r.summary for r in again.runs] == [r.summary for r in res.runs]
    assert vengine.engine.weights == {"kind": "folder", "path": str(vengine.materialized)}  # no α was reloaded


@pytest.mark.vllm
def test_lora_adapters_and_checkpoint_list(vengine, lora_pair, tmp_path):
    opts = EvalOptions(limit=2, progress=False, params_b=1)
    out = tmp_path / "loras"
    res = evaluate(model=vengine.base, loras=lora_pair.adapters, alphas=(0.3, 0.7), output=out,
                   engine=vengine.engine, sampling=SAMPLING, options=opts)
    assert [r.label for r in res.runs] == ["alpha-0.3", "alpha-0.7"]
    assert json.loads((out / "alpha-0.3" / "gsm8k" / "run.json").read_text())["settings"]["lora"] == \
        str(lora_pair.adapters[0])
    _check_table(res, out, "summary-gsm8k")
    out2 = tmp_path / "ckpts"
    res2 = evaluate(checkpoints=[vengine.base, vengine.materialized], output=out2, engine=vengine.engine,
                    sampling=SAMPLING, options=opts, prompt=PromptOptions(instruction=""))
    assert [r.alpha for r in res2.runs] == [None, ALPHA]
    _check_table(res2, out2, "summary-gsm8k")
