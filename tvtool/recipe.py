"""Sweep recipes: a YAML file validated at load into frozen dataclasses.

The schema reuses the options the verbs already define (`PromptOptions`,
`SamplingOptions`, `EngineOptions`), so a field means the same thing in a recipe, on
the command line and in Python. Errors name the bad field, e.g. `datasets[0].limit`.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .engine import EngineOptions, SamplingOptions
from .errors import RecipeError
from .prompting import PromptOptions
from .options import unwrap_optional, opt


@dataclass(frozen=True)
class DatasetSpec:
    name: str = opt(None, "gsm8k | math500 | toy, a file path (ASDiv.xml, .jsonl) or a Hub dataset id.")
    split: str = opt("test", "Dataset split.")
    limit: int | None = opt(None, "Only the first N problems (N random ones with seed).")
    seed: int | None = opt(None, "Shuffle before limit.")
    kind: str | None = opt(None, "Answer format of a file: gsm8k | math500 | asdiv (default: detected).")
    max_tokens: int | None = opt(None, "Overrides sampling.max_tokens for this dataset (paper: 4192 GSM8K, 8192 hard).")


@dataclass(frozen=True)
class LowRankSpec:
    rank: int | None = opt(None, "Rank of every factorized tensor.")
    energy: float | None = opt(None, "Or: the smallest rank keeping this share of ‖Δ‖² per tensor.")
    max_rank: int | None = opt(None, "Cap for energy-chosen ranks.")
    method: Literal["randomized", "exact"] = opt("randomized", "SVD method.")
    include: str | None = opt(None, "Factorize only tensors matching this regex.")
    exclude: str | None = opt(None, "Never factorize tensors matching this regex.")


@dataclass(frozen=True)
class KeepSpec:
    delta: bool = opt(False, "Write Δ to disk (always done when low_rank is set).")
    models: bool = opt(False, "Write merged α folders even when α is applied in-engine (needed to push models).")


@dataclass(frozen=True)
class PushSpec:
    enabled: bool = opt(False, "Push the α models (or adapters) at the end.")
    dry_run: bool = opt(True, "Only list what would be uploaded.")
    repo: str | None = opt(None, "Repo id template with {user}, {name}, {alpha}.")
    private: bool = opt(True, "Create private repos.")


@dataclass(frozen=True)
class Recipe:
    name: str = opt(None, "Name of the run (used in the default output folder).")
    base: str = opt(None, "θ1: a model folder or Hub id (relative paths: from the recipe's folder).")
    reasoner: str = opt(None, "θ2: a model folder or Hub id.")
    alphas: tuple[float, ...] = opt((), "α values to evaluate.")
    datasets: tuple[DatasetSpec, ...] = opt((), "Evaluation datasets.")
    apply: Literal["swap", "materialize", "lora"] = opt(
        "swap", "How α is applied: swap = θ1 + αΔ loaded into one running engine; materialize = folders on disk; "
                "lora = one LoRA adapter per α (needs low_rank).")
    low_rank: LowRankSpec | None = opt(None, "Replace Δ by a low-rank approximation first.")
    include: str | None = opt(None, "Apply α only to tensors matching this regex (apply: swap or materialize).")
    exclude: str | None = opt(None, "Do not apply α to tensors matching this regex (apply: swap or materialize).")
    prompt: PromptOptions = field(default_factory=PromptOptions, metadata={"help": "Prompt settings."})
    sampling: SamplingOptions = field(default_factory=SamplingOptions, metadata={"help": "Decoding settings."})
    engine: EngineOptions = field(default_factory=EngineOptions, metadata={"help": "vLLM engine settings."})
    params_b: float | None = opt(None, "Nominal size in billions for ACU (default: counted).")
    keep: KeepSpec = field(default_factory=KeepSpec, metadata={"help": "What to keep on disk."})
    push: PushSpec = field(default_factory=PushSpec, metadata={"help": "What to push (dry run by default)."})
    output: str = opt("runs/{name}", "Output folder.")


REQUIRED = {Recipe: ("name", "base", "reasoner", "alphas", "datasets"), DatasetSpec: ("name",)}


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe; relative model/dataset paths are resolved from its folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError("recipe not found", where=str(path), fix="check the path") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe is not valid YAML: {str(e).splitlines()[0]}", where=str(path)) from None
    r = build(Recipe, data, "", str(path))
    if r.apply == "lora" and r.low_rank is None:
        raise RecipeError("field apply is 'lora' but low_rank is not set", where=str(path),
                          fix="add low_rank: {rank: N}, or use apply: swap")
    if r.low_rank is not None and (r.low_rank.rank is None) == (r.low_rank.energy is None):
        raise RecipeError("field low_rank needs exactly one of rank and energy", where=str(path))
    for key in ("include", "exclude"):
        pattern = getattr(r, key)
        if pattern is not None and r.apply == "lora":
            raise RecipeError(f"field {key} does not apply to apply: lora", where=str(path),
                              fix="select tensors with low_rank.include/exclude instead")
        try:
            re.compile(pattern or "")
        except re.error as e:
            raise RecipeError(f"field {key} is not a valid regular expression: {e}", where=str(path)) from None
    here = path.resolve().parent

    def local(v: str) -> str:
        return str((here / v).resolve()) if not Path(v).is_absolute() and (here / v).exists() else v

    ds = tuple(dataclasses.replace(d, name=local(d.name)) for d in r.datasets)
    return dataclasses.replace(r, base=local(r.base), reasoner=local(r.reasoner), datasets=ds)


def build(cls: type, data: Any, where: str, file: str):
    """`cls(**data)` with every field checked; errors name the field path."""
    if not isinstance(data, dict):
        raise RecipeError(f"{'field ' + where if where else 'the recipe'} must be a mapping, got {_show(data)}",
                          where=file)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            raise RecipeError(f"unknown field {_join(where, k)}", where=file, fix=f"known fields: {', '.join(names)}")
    for k in REQUIRED.get(cls, ()):
        if data.get(k) is None:
            raise RecipeError(f"missing field {_join(where, k)}", where=file)
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(hints[k], v, _join(where, k), file) for k, v in data.items()})


def _coerce(tp, v, where: str, file: str):
    tp, optional = unwrap_optional(tp)
    if v is None:
        if optional:
            return None
        raise RecipeError(f"field {where} must not be empty", where=file)
    if dataclasses.is_dataclass(tp):
        return build(tp, v, where, file)
    origin = typing.get_origin(tp)
    if origin is tuple:
        if not isinstance(v, list):
            raise RecipeError(f"field {where} must be a list, got {_show(v)}", where=file)
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(inner, x, f"{where}[{i}]", file) for i, x in enumerate(v))
    if origin is Literal:
        if v not in typing.get_args(tp):
            raise RecipeError(f"field {where} must be one of {', '.join(map(str, typing.get_args(tp)))}, "
                              f"got {_show(v)}", where=file)
        return v
    ok = {float: lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
          int: lambda x: isinstance(x, int) and not isinstance(x, bool),
          bool: lambda x: isinstance(x, bool), str: lambda x: isinstance(x, str)}[tp]
    if not ok(v):
        what = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}[tp]
        raise RecipeError(f"field {where} must be {what}, got {_show(v)}", where=file)
    return float(v) if tp is float else v


def _join(where: str, k) -> str:
    return f"{where}.{k}" if where else str(k)


def _show(v) -> str:
    return repr(v) if not isinstance(v, (dict, list)) else type(v).__name__


def to_dict(r: Recipe) -> dict:
    """The recipe as plain data (for REPORT.md and report.json)."""
    return dataclasses.asdict(r)
