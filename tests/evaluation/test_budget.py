"""The prompt-control baseline (CoT-Valve appendix B, Table 12) next to α, on the bundled toy pair."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tvtool.evaluation.budget import TEMPLATES, budget_variants
from tvtool.evaluation.data import load_problems
from tvtool.errors import OptionsError
from tvtool.engine.prompting import PromptOptions
from tvtool.evaluation.results import STAT_KEYS, read_samples, summarize
from tvtool.sweep.recipe import load_recipe
from tvtool.sweep.run import SweepOptions, sweep

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "toy.yaml"


def test_templates_are_the_papers():
    probs = load_problems(dataset="toy", limit=1)
    (b, ps, opts, extra), = budget_variants(problems=probs, prompt=PromptOptions(), budgets=[20], template="qwq")
    assert ps.problems[0].question == f"Generate the solution in less than 20 tokens. {probs.problems[0].question}"
    assert opts.system_prompt == ("You are a helpful and harmless assistant. You are Qwen developed by Alibaba. "
                                  "You should think step-by-step.") and opts.instruction == ""
    assert extra == {"prompt_budget": 20, "budget_template": "qwq"}
    (_, ps, opts, _), = budget_variants(problems=probs, prompt=PromptOptions(system_prompt="S"), budgets=[100],
                                        template="llama")
    assert ps.problems[0].question == ("Given the following problem, reason and give a final answer to the problem "
                                       f"using less than 100 tokens.\n{probs.problems[0].question}")
    assert opts.system_prompt == "S" and TEMPLATES["llama"].system is None
    with pytest.raises(OptionsError, match=r"^prompt budgets must be positive integers, got \[0\]"):
        budget_variants(problems=probs, prompt=PromptOptions(), budgets=[0], template="qwq")


@pytest.mark.vllm
def test_prompt_budget_sweep_writes_table_12_rows(tmp_path, capfd):
    r = load_recipe(RECIPE)
    r = r.model_copy(update={"alphas": (0.0, 1.0), "prompt_budgets": (20, 50),
                             "datasets": (replace(r.datasets[0], limit=4),)})
    res = sweep(recipe=r, options=SweepOptions(output=str(tmp_path), progress=False))
    assert res.engine_starts == 1
    (name, rows), = res.tables.items()
    assert [(x["label"], x["alpha"], x["prompt_budget"]) for x in rows] == [
        ("alpha-0", 0.0, None), ("alpha-1", 1.0, None), ("budget-20", 1.0, 20), ("budget-50", 1.0, 50)]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["tables"][name] == rows
    for row in rows:
        folder = tmp_path / "eval" / row["label"] / name
        records = read_samples(folder / "samples.jsonl")
        s = summarize(records=records, params_b=None)
        assert len(records) == 4
        for k in ("accuracy", "mean_tokens", "truncated", *STAT_KEYS):
            assert row.get(k) == s.get(k), k  # (the n > 1 keys are in neither: one sample per problem)
        model = json.loads((folder / "run.json").read_text())["settings"]["model"]
        if row["prompt_budget"]:
            assert (model["prompt_budget"], model["budget_template"], model["alpha"]) == (row["prompt_budget"],
                                                                                          "qwq", 1.0)
            assert all(f"Generate the solution in less than {row['prompt_budget']} tokens. " in x["prompt"]
                       for x in records)
    text = (tmp_path / "REPORT.md").read_text()
    assert ("| run | α | tokens in prompt | accuracy % | mean #tokens | ACU | #truncated | #samples | no box % | "
            "hit max % | acc. boxed % | reflections/resp. |") in text
    assert "| budget-20 | 1 | 20 | " in text and "Answer rule: **paper**" in text
    # what the user saw: no vLLM lines; they are in the log file
    out, err = capfd.readouterr()
    assert "INFO" not in out + err and "EngineCore" not in out + err, (out + err)[-2000:]
    assert "INFO" in (tmp_path / "eval" / "vllm.log").read_text()
