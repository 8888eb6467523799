"""`tvtool sweep` on the bundled toy pair: the toy bar, report = records, and resume after a kill."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tvtool.evaluation.results import read_samples, summarize
from tvtool.sweep.run import SweepOptions, sweep

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "toy.yaml"
ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The toy recipe over α = 0, 0.1, …, 1.0 on a 100-problem slice: one engine, weights swapped in place."""
    out = tmp_path_factory.mktemp("toy-sweep")
    return sweep(recipe=RECIPE, options=SweepOptions(output=str(out), alphas=ALPHAS, limit=100, progress=False))


def _rows(result):
    (name, rows), = result.tables.items()
    return {r["alpha"]: r for r in rows}


@pytest.mark.vllm
def test_toy_bar(toy_run):
    """Moving α moves the chain length, and accuracy holds: the bar the shipped pair must meet."""
    rows = _rows(toy_run)
    lengths = [rows[a]["mean_tokens"] for a in ALPHAS]
    assert all(x <= y for x, y in zip(lengths, lengths[1:])), lengths  # non-decreasing
    assert lengths[-1] >= 4 * lengths[0], lengths
    inside = [x for x in lengths if 1.1 * lengths[0] < x < 0.9 * lengths[-1]]
    assert len(inside) >= 4, lengths
    assert min(rows[a]["accuracy"] for a in ALPHAS) >= 85, {a: rows[a]["accuracy"] for a in ALPHAS}
    assert toy_run.engine_starts == 1


@pytest.mark.vllm
def test_report_equals_what_the_records_recompute(toy_run):
    report = json.loads((toy_run.output / "report.json").read_text())
    (name, rows), = report["tables"].items()
    assert [r["alpha"] for r in rows] == list(ALPHAS)
    for r in rows:
        records = read_samples(toy_run.output / "eval" / r["label"] / name / "samples.jsonl")
        assert len(records) == 100 and len({x["id"] for x in records}) == 100
        assert all(x["num_tokens"] == len(x["token_ids"]) for x in records)
        s = summarize(records=records, params_b=None)
        assert (r["accuracy"], r["mean_tokens"], r["truncated"]) == (s["accuracy"], s["mean_tokens"], s["truncated"])
    text = (toy_run.output / "REPORT.md").read_text()
    assert "| alpha-0.5 | 0.5 |" in text and "tvtool sweep" in text and "## Versions" in text
    # the toy has no thinking tags, one sample per problem and no difficulty levels: none of their columns
    assert not any(w in text for w in ("thinking #tokens", "unfinished %", "maj@n", "By difficulty", "Thinking:"))
    assert (toy_run.output / f"plot-{name}.png").stat().st_size > 1000


@pytest.mark.vllm
def test_resume_after_a_kill_redoes_nothing_finished(toy_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(toy_run.output, out)
    (name, _), = toy_run.tables.items()
    # What a kill in the middle of α = 1.0 leaves: half its samples and a torn last line, no summary.
    victim = out / "eval" / "alpha-1" / name
    lines = (victim / "samples.jsonl").read_text().splitlines(keepends=True)
    (victim / "samples.jsonl").write_text("".join(lines[:50]) + lines[50][:40])
    (victim / "summary.json").unlink()
    others = {p: p.stat().st_mtime_ns for p in (out / "eval").glob("alpha-0*/*/samples.jsonl")}
    again = sweep(recipe=RECIPE, options=SweepOptions(output=str(out), alphas=ALPHAS, limit=100, progress=False))
    assert again.engine_starts == 1
    assert {p: p.stat().st_mtime_ns for p in others} == others  # finished α untouched
    records = read_samples(victim / "samples.jsonl")
    assert len(records) == 100 and len({r["id"] for r in records}) == 100
    assert again.tables == toy_run.tables  # same report as one uninterrupted run
    third = sweep(recipe=RECIPE, options=SweepOptions(output=str(out), alphas=ALPHAS, limit=100, progress=False))
    assert third.engine_starts == 0 and third.tables == toy_run.tables
