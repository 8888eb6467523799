"""The merge operators in the remaining paths that apply a task vector (issue 12, "Everywhere α is used").

- a recipe's `low_rank` stage with `merge:` factors the operator's M (`svd_rank` with its settings), the
  runs apply α and its rules to M, the report says so, and an edited density redoes the factorization
  and the runs it feeds; the stage-by-stage commands parse back into the same settings.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import yaml

from test_faults import _FakeEngine
from tvtool.cli import main
from tvtool.lowrank_merge import MERGE_FLAGS
from tvtool.merge import MergeConfig
from tvtool.merge_options import MergeOptions
from tvtool.options import from_cli
from tvtool.recipe import load_recipe, low_rank_merge

TOY = Path(__file__).resolve().parents[1] / "tvtool" / "assets" / "toy"


def _recipe(path: Path, *, density: float, **extra) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "t", "base": str(TOY / "base"), "reasoner": str(TOY / "reasoner"), "apply": "swap",
        "merge": {"method": "trim", "density": density, "alphas": [0.5, 0.8], "rules": ["mlp=1", ".=0.5"]},
        "datasets": [{"name": "toy", "limit": 2}], "prompt": {"instruction": ""}, "sampling": {"max_tokens": 8},
        **extra}))
    return path


def test_sweep_low_rank_factors_the_operators_m(tmp_path, monkeypatch, capsys):
    from tvtool.sweep import SweepOptions, _commands, sweep

    monkeypatch.setattr(sys.modules["tvtool.sweep"], "Engine", _FakeEngine)
    out, recipe = tmp_path / "sweep", tmp_path / "r.yaml"
    opts = SweepOptions(output=str(out), progress=False)
    _FakeEngine.made.clear()
    sweep(recipe=_recipe(recipe, density=0.5, low_rank={"rank": 2}), options=opts)
    report = json.loads((out / "lowrank" / "delta.lowrank.json").read_text())
    assert report["merge"] == {"method": "trim", "density": 0.5} and not (out / "delta").exists()
    held = {json.loads(w)["config"]["alpha"]: json.loads(w) for e in _FakeEngine.made for w, _ in e.generated}
    rules = (("mlp", 1.0), (".", 0.5))
    for a in (0.5, 0.8):  # α and its rules applied to the factored M (one task vector, no operator left)
        assert MergeConfig.from_dict(held[a]["config"]) == MergeConfig(a, rules=rules)
        assert held[a]["source"]["delta"] == str(out / "lowrank" / "delta.safetensors")
    assert "The `trim` operator's M (density=0.5) in place of Δ" in (out / "REPORT.md").read_text()
    capsys.readouterr()
    _FakeEngine.made.clear()
    sweep(recipe=_recipe(recipe, density=0.3, low_rank={"rank": 2}), options=opts)  # edited density
    err = capsys.readouterr().err
    assert "merge.density 0.5 → 0.3: redoing svd-rank delta.safetensors" in err
    assert sum(len(e.generated) for e in _FakeEngine.made) == 4  # both α runs generated again

    r = load_recipe(recipe)
    (svd,) = [c for c in _commands(r, out) if c.startswith("tvtool svd-rank ")]
    kw = dict(main.commands["svd-rank"].make_context("svd-rank", shlex.split(svd)[2:]).params)
    assert (Path(kw["base"]).resolve(), Path(kw["reasoner"]).resolve()) == (TOY / "base", TOY / "reasoner")
    assert from_cli(MergeOptions, kw, rename=MERGE_FLAGS) == MergeOptions(method="trim", density=0.3)
    assert low_rank_merge(r) == MergeOptions(method="trim", density=0.3, vectors=())
    evals = [c for c in _commands(r, out) if c.startswith("tvtool eval ")]
    kw = dict(main.commands["eval"].make_context("eval", shlex.split(evals[0])[2:]).params)
    assert from_cli(MergeOptions, kw) == MergeOptions(alpha_rules=("mlp=1", ".=0.5"))
    assert kw["delta_path"].endswith("lowrank/delta.safetensors")
