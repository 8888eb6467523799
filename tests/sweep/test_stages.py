"""The sweep's stages: the folder is the registry, the `serve:` stage prints its command and nothing more,
and a refused output is refused before a byte is written."""

from __future__ import annotations

import hashlib
import pkgutil
import sys
from pathlib import Path

import pytest
import yaml

import tvtool
from engine_setup import RecordingEngine
from helpers import assert_one_line_error, cli
from tvtool.errors import RecipeError
from tvtool.sweep import stages as stages_pkg
from tvtool.sweep.recipe import FIELDS, load_recipe
from tvtool.sweep.stages import STAGES

TOY = Path(tvtool.__file__).parent / "assets" / "toy"


def test_every_module_in_the_stages_folder_is_a_registered_stage():
    modules = {f"{stages_pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(stages_pkg.__path__)}
    assert {type(s).__module__ for s in STAGES} == modules
    assert len({s.name for s in STAGES}) == len(STAGES)
    assert [s.name for s in STAGES] == ["delta", "low_rank", "models", "eval", "mixchain", "train", "table1", "push",
                                        "serve"]
    assert {s.section.name for s in STAGES if s.section} <= set(FIELDS)
    # `sweep --overwrite` discards the folders the stages own, and nothing else
    assert {f for s in STAGES for f in s.folders} == {"delta", "lowrank", "models", "eval", "mixchain", "train",
                                                      "valves"}


def _recipe(path: Path, **extra) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "t", "base": str(TOY / "base"), "reasoner": str(TOY / "reasoner"), "alphas": [0.5],
        "datasets": [{"name": "toy", "limit": 2}], "prompt": {"instruction": ""}, "sampling": {"max_tokens": 8},
        **extra}, sort_keys=False))
    return path


VALVE = {"name": "pp", "mode": "valve++", "data": "d.jsonl"}


@pytest.mark.parametrize("serve,message", [
    ({"valve": "pp", "alphas": [0.5], "colour": 1}, "unknown field serve.colour"),
    ({"alphas": [0.5]}, "missing field serve.valve"),
    ({"valve": "qq", "alphas": [0.5]}, "field serve.valve is 'qq', not a valve of this recipe ({p}). "
                                       "Name one of: pp"),
    ({"valve": "low_rank", "alphas": [0.5]}, "field serve.valve is 'low_rank', not a valve of this recipe ({p}). "
                                             "Name one of: pp"),
    ({"valve": "pp", "alphas": []}, "field serve.alphas is invalid: no α to serve ({p}). Pass e.g. --alpha 0,0.5,1"),
    ({"valve": "pp", "alphas": [0.5], "alpha_range": "0:1"},
     "field serve.alpha_range is invalid: --alpha-range needs --any-alpha ({p}). Add --any-alpha, or remove --alpha-range"),
    ({"valve": "pp", "alphas": [0.5], "any_alpha": True, "alpha_range": "1:0.5"},
     "field serve.alpha_range is invalid: bad α range '1:0.5' ({p}). Need finite LO ≤ HI, e.g. 0:1.25"),
    ({"valve": "pp", "alphas": [0.5], "any_alpha": True, "alpha_range": [0, 1]},
     "field serve.alpha_range must be a string, got list ({p})"),
    ({"valve": "pp", "alphas": [0.5], "port": 70000},
     "field serve.port is invalid: port 70000 is not a TCP port ({p}). Use 1-65535"),
    ({"valve": "pp", "name": "toy valve"},
     "field serve.name is invalid: bad model name 'toy valve' ({p}). Use letters, digits"),
    ({"valve": "pp", "api_key": "sk-1"}, "field serve.api_key would be written into the run's recipe.yaml and "
                                         "REPORT.md ({p}). Remove it and set VLLM_API_KEY where the server runs"),
])
def test_a_bad_serve_entry_names_its_field(tmp_path, serve, message):
    p = _recipe(tmp_path / "r.yaml", train=[VALVE], serve=serve)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(e.value).startswith(message.format(p=p)), str(e.value)


def test_serve_stage_prints_the_serve_command_in_the_output_and_the_report(tmp_path, monkeypatch):
    """A recipe ending with `serve:` runs its stages, then prints (and only prints) `tvtool serve` for the valve."""
    monkeypatch.setattr(sys.modules["tvtool.sweep.stages.evaluate"], "Engine", RecordingEngine)
    monkeypatch.chdir(tmp_path)
    serve = {"valve": "low_rank", "alphas": [0, 0.5, 1], "any_alpha": True, "alpha_range": "-0.5:1.5",
             "host": "0.0.0.0", "port": 8001, "name": "toy-valve", "max_loras": 2}
    recipe = _recipe(tmp_path / "r.yaml", low_rank={"rank": 2}, serve=serve,
                     engine={"dtype": "float32", "max_model_len": 256, "enforce_eager": True})
    r = cli("sweep", recipe, "-o", tmp_path / "run", "--no-progress")
    assert r.exit_code == 0, r.stderr
    base = Path(TOY / "base")
    import os

    want = (f"tvtool serve --base {os.path.relpath(base, tmp_path)} --delta run/lowrank/delta.safetensors "
            "--alpha 0,0.5,1 --name toy-valve --any-alpha --alpha-range -0.5:1.5 --max-loras 2 --host 0.0.0.0 "
            "--port 8001 "
            "--dtype float32 --max-model-len 256 --enforce-eager")  # the recipe's engine, as the server's
    report = (tmp_path / "run" / "REPORT.md").read_text()
    section = "## Serve\n\nOnce the sweep has finished (paths as in Reproduce):\n\n```bash\n" + want + "\n```\n"
    assert section in report and section in r.stdout
    assert report.index("## Serve") < report.index("## Reproduce")
    assert "tvtool serve" not in report.split("## Reproduce")[1].split("## Recipe")[0]  # not a stage the sweep runs
    assert load_recipe(tmp_path / "run" / "recipe.yaml").serve == load_recipe(recipe).serve

    plain = _recipe(tmp_path / "p.yaml", train=[{**VALVE, "model": "base"}],
                    serve={"valve": "pp", "alphas": [1]})
    from tvtool.sweep.stages.serve import serve_command

    assert serve_command(load_recipe(plain), "out") == ["tvtool", "serve", "--base", str(base), "--delta",
                                                        "out/train/pp", "--alpha", "1"]


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["is", "inside", "contains"])
def test_a_sweep_into_an_input_is_refused_before_anything_is_written(tmp_path, where):
    import shutil

    base = tmp_path / "models" / "base"
    shutil.copytree(TOY / "base", base)
    recipe = _recipe(tmp_path / "r.yaml")
    recipe.write_text(recipe.read_text().replace(str(TOY / "base"), str(base)))
    out = {"is": base, "inside": base / "run", "contains": tmp_path / "models"}[where]
    before, listing = _digest(tmp_path / "models"), sorted(p.name for p in tmp_path.iterdir())
    r = cli("sweep", recipe, "-o", out)
    relation = {"is": "is", "inside": "is inside", "contains": "contains"}[where]
    assert_one_line_error(r, f"the output {relation} the input {base} (-o {out}). "
                             "Write the output somewhere outside every input")
    assert r.exit_code == 2
    assert _digest(tmp_path / "models") == before  # no byte of the input changed, nothing added to it
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no lock file, no output folder


def test_serve_paths_are_from_the_recipes_folder_as_every_recipe_path(tmp_path):
    (tmp_path / "sub" / "c").mkdir(parents=True)  # a local path that exists (else it could be a Hub id)
    p = _recipe(tmp_path / "sub" / "r.yaml", train=[VALVE], serve={"valve": "pp", "cache": "c", "log": "/abs/s.log"})
    s = load_recipe(p).serve
    assert (s.cache, s.log) == (str(tmp_path / "sub" / "c"), "/abs/s.log")
