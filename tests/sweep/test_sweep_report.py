"""The sweep report's new parts, without an engine: the decoding protocol, the thinking and n > 1
notes, and per dataset the per-level tables and plot (only where the rows carry them)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from tvtool.sweep.recipe import load_recipe
from tvtool.sweep.run import write_report
from tvtool.sweep.stage import SweepState
from tvtool.vectors.source import DeltaSource

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "toy.yaml"


def _row(label: str, alpha: float, tokens: dict[str, float]) -> dict:
    lv = {lev: {"n_samples": 4, "n_problems": 2, "accuracy": 50.0, "mean_tokens": t, "thinking_tokens_mean": t - 5,
                "answer_tokens_mean": 5.0, "unfinished_share": 0.0, "reflections_mean": 1.0,
                "reflective_share": 50.0} for lev, t in tokens.items()}
    return {"label": label, "alpha": alpha, "accuracy": 50.0, "accuracy_se": 10.0, "maj_accuracy": 50.0,
            "pass_at_n": 75.0, "mean_tokens": sum(tokens.values()) / 2, "thinking_tokens_mean": 50.0,
            "answer_tokens_mean": 5.0, "unfinished_share": 0.0, "n_samples": 8, "think_end": "</think>",
            "difficulty_field": "level", "by_level": lv}


def _report(*, out: Path, recipe, tables: dict) -> Path:
    """REPORT.md of a sweep whose stages left `tables` (no stage adds its own parts)."""
    state = SweepState(recipe=recipe, recipe_path=RECIPE, out=out, alphas=recipe.alphas,
                       source=DeltaSource(base=recipe.base, reasoner=recipe.reasoner), configs=[], tables=tables)
    out.mkdir(parents=True, exist_ok=True)
    return write_report(state=state, stages=[])


def test_report_has_protocol_notes_and_levels(tmp_path):
    r = load_recipe(RECIPE)
    r = r.model_copy(update={"sampling": replace(r.sampling, protocol="deepseek-r1", n=2)})
    tables = {"math500": [_row("alpha-0", 0.0, {"1": 20.0, "5": 90.0}), _row("alpha-1", 1.0, {"1": 100.0, "5": 180.0})],
              "toy": [{"label": "alpha-0", "alpha": 0.0, "accuracy": 96.0, "mean_tokens": 19.6, "n_samples": 2}]}
    report = _report(out=tmp_path, recipe=r, tables=tables)
    text = report.read_text()
    assert "protocol **deepseek-r1** (temperature 0.6, top-p 0.95), max_tokens=200, n=2 samples per problem." in text
    assert "Thinking: the answer rule read the text after the last `</think>`" in text
    assert "Several samples per problem:" in text
    assert ("| run | α | accuracy % | ± SE | maj@n % | pass@n % | mean #tokens | thinking #tokens "
            "| answer #tokens |") in text
    assert "### math500 by difficulty" in text and "| alpha-0 | 0 | 0.20 | 0.50 |" in text
    assert "![math500 by level](plot-math500-levels.png)" in text
    assert "### toy by difficulty" not in text and not (tmp_path / "plot-toy-levels.png").exists()
    assert (tmp_path / "plot-math500-levels.png").stat().st_size > 1000
    plots = json.loads((tmp_path / "report.json").read_text())["plots"]
    assert plots["math500-levels"] == "plot-math500-levels.png" and "toy-levels" not in plots
    plain = _report(out=tmp_path / "plain", recipe=load_recipe(RECIPE), tables={"toy": tables["toy"]}).read_text()
    assert "greedy=True, max_tokens=200." in plain and "Thinking:" not in plain and "Several samples" not in plain
