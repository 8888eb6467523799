"""The toy valves bundled as package assets (++ and +P of recipes/toy-valve.yaml) against the committed report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tvtool.lowrank.alpha_adapter import open_valve
from tvtool.toy import REASONER_DIR, VALVE_DIR
from tvtool.vectors.source import DeltaSource

REPORT = Path(__file__).parents[2] / "reports" / "toy-valve" / "REPORT.md"


def report_table(name: str) -> dict[float, tuple[float, float]]:
    """α → (accuracy %, mean #tokens) of the committed report's `## name` table."""
    text = REPORT.read_text()
    section = text[text.index(f"## {name}\n"):].split("\n## ", 1)[0]
    rows = re.findall(r"^\| alpha-[^|]+ \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", section, flags=re.M)
    return {float(a): (float(acc), float(tok)) for a, acc, tok in rows}


@pytest.mark.parametrize("name", ["plusplus", "progressive"])
def test_bundled_valves_are_small_plain_lora_adapters_of_the_toy_reasoner(name):
    folder = VALVE_DIR / name
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert sum(p.stat().st_size for p in folder.iterdir()) < 1 << 20
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"]) == \
        ("LORA", 8, 16, "tvtool/assets/toy/reasoner")
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n") and "recipes/toy-valve.yaml" in card
    valve = open_valve(folder)
    assert valve.kind == "peft" and len(valve.modules) == 4 * 7 and valve.rank == 8


def test_the_recipe_and_report_point_at_the_bundled_valves():
    assert "tvtool/assets/toy/valves/plusplus" in (Path(__file__).parents[2] / "recipes" / "toy-valve.yaml").read_text()
    assert "tvtool/assets/toy/valves/plusplus" in REPORT.read_text()


@pytest.mark.vllm
@pytest.mark.slow
def test_bundled_plusplus_gives_the_reports_lengths(tmp_path):
    """θ + α·Δθ′ in place (the report's path), greedy, float32, all 300 toy questions: the committed table."""
    from tvtool.engine.options import EngineOptions, SamplingOptions
    from tvtool.engine.prompting import PromptOptions
    from tvtool.evaluation.evaluate import evaluate
    from tvtool.evaluation.runs import EvalOptions

    alphas = (0.0, 0.5, 1.0)
    res = evaluate(source=DeltaSource(base=str(REASONER_DIR), delta=str(VALVE_DIR / "plusplus")), alphas=alphas,
                   output=tmp_path, options=EvalOptions(dataset="toy", progress=False),
                   prompt=PromptOptions(instruction=""), sampling=SamplingOptions(max_tokens=200),
                   engine_options=EngineOptions(dtype="float32", max_model_len=256, enforce_eager=True,
                                                cpu_kv_cache_gb=1))
    want = report_table("toy-plusplus")
    got = {r.alpha: (round(r.summary["accuracy"], 1), round(r.summary["mean_tokens"], 1)) for r in res.runs}
    assert got == {a: want[a] for a in alphas}  # e.g. α = 0: 97.0 %, 91.3 tokens; α = 1: 96.3 %, 16.4
