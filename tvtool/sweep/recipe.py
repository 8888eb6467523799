"""Sweep recipes: a YAML file validated at load by pydantic into frozen, typed settings.

The schema nests the options the verbs already define (`LowRankOptions`,
`MaterializeOptions`, `PromptOptions`, `SamplingOptions`, `EngineOptions`, `PushOptions`),
so a field means the same thing in a recipe, on the command line and in Python. Values are checked
with JSON's types (pydantic strict JSON mode: a list for a tuple, no `true` for an
integer, no '0.5' for a number). Every error is one `RecipeError` line naming the
field path and the file, e.g. `field datasets[0].limit must be an integer, got 'many' (r.yaml)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import string
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tvtool.engine.options import EngineOptions, SamplingOptions
from tvtool.errors import OptionsError, RecipeError
from tvtool.io.hub import PushOptions
from tvtool.lowrank.svd import LowRankOptions
from tvtool.merge.materialize import MaterializeOptions
from tvtool.merge.config import MergeConfig
from tvtool.merge.options import MergeOptions, option_fields
from tvtool.engine.prompting import PromptOptions
from tvtool.options import opt, unwrap_optional
from tvtool.evaluation.units import RayOptions
from tvtool.sweep.valve_spec import MixChainSpec, TrainSpec, check_valve_stages
from tvtool.vectors.source import DeltaSource, SourceOptions


@dataclass(frozen=True)
class DatasetSpec:
    name: str = dataclasses.field(
        metadata={"help": "gsm8k | math500 | toy, a file path (ASDiv.xml, .jsonl) or a Hub dataset id."})
    split: str = opt("test", "Dataset split.")
    limit: int | None = opt(None, "Only the first N problems (N random ones with seed).")
    seed: int | None = opt(None, "Shuffle before limit.")
    kind: str | None = opt(None, "Answer format of a file: gsm8k | math500 | asdiv (default: detected).")
    max_tokens: int | None = opt(None, "Overrides sampling.max_tokens for this dataset (paper: 4192 GSM8K, 8192 hard).")


@dataclass(frozen=True)
class KeepSpec:
    delta: bool = opt(False, "Write Δ to disk (always done when low_rank is set).")
    models: bool = opt(False, "Write merged α folders even when α is applied in-engine (needed to push models).")


@dataclass(frozen=True)
class PushStage(PushOptions):
    """`tvtool push` options plus whether the stage runs; in a recipe a push is a dry run unless it says not."""

    dry_run: bool = opt(True, "Only list what would be uploaded.")
    enabled: bool = opt(False, "Push the α models (or adapters) at the end.")


# --- merge operators: `merge:` and `vectors:` ------------------------------------------------------
@dataclass(frozen=True)
class VectorSpec:
    model: str = dataclasses.field(metadata={"help": "A model of the same base: Δ_i = model − base."})
    weight: float = opt(1.0, "Its weight w_i in the merge.")


# One `merge:` entry: the `MergeOptions` fields (the operator registry's; weights come from `vectors:`) and its α.
MergeSpec = dataclasses.make_dataclass("MergeSpec", [
    *((n, t, dataclasses.field(default=f.default, metadata=f.metadata))
      for n, t, f in option_fields(exclude=("weights",))),
    ("alphas", tuple[float, ...], opt((), "α (λ) values for this operator (default: the recipe's alphas)."))],
    frozen=True)
MergeSpec.__module__ = __name__


@dataclass(frozen=True)
class ExecutorSpec:  # --- ray: tvtool.evaluation.cluster ---
    ray: RayOptions | None = opt(None, "Evaluate on a Ray cluster: {address, engines, gpus_per_engine, "
                                       "cpus_per_engine, retries, cpu_bind} (see tvtool.evaluation.cluster).")


def _normalize(data: dict, file: str) -> dict:
    """`merge:` may be one mapping; with `vectors:` the first vector is the reasoner."""
    if isinstance(data.get("merge"), dict):
        data = {**data, "merge": [data["merge"]]}
    vs = data.get("vectors")
    if vs and isinstance(vs, (list, tuple)) and isinstance(vs[0], dict) and "model" in vs[0]:
        if data.get("reasoner") is not None and data["reasoner"] != vs[0]["model"]:
            raise RecipeError("give reasoner or vectors, not both", where=file, fix="list the reasoner in vectors")
        data = {**data, "reasoner": vs[0]["model"]}
    return data


def merge_options(m: MergeSpec, vectors: typing.Sequence[VectorSpec] = ()) -> MergeOptions:
    """The `MergeOptions` (CLI/API settings) of one `merge:` entry, with the weights of `vectors`."""
    return MergeOptions(**{f.name: getattr(m, f.name) for f in dataclasses.fields(MergeOptions) if f.name != "weights"},
                        weights=tuple(v.weight for v in vectors))


def delta_source(r: "_RecipeFields") -> DeltaSource:
    """The recipe's source of Δ: base, reasoner (or `vectors:`, the first being the reasoner) and `source:`
    (built by `DeltaSource.build`, as the CLI's source flags are)."""
    source, _ = DeltaSource.build(base=r.base, reasoner=None if r.vectors else r.reasoner,
                                  vectors=[(v.model, v.weight) for v in r.vectors], options=r.source)
    return source


def merge_configs(r: "_RecipeFields") -> list[MergeConfig]:
    """The recipe's `MergeConfig`s: one per (merge entry, α); plain θ1 + α·Δ without `merge:`."""
    out = []
    for m in r.merge or (MergeSpec(),):
        out += merge_options(m, r.vectors).configs(m.alphas or r.alphas, include=r.materialize.include,
                                                   exclude=r.materialize.exclude)
    return list(dict.fromkeys(out))


def low_rank_merge(r: "_RecipeFields") -> MergeOptions | None:
    """What `low_rank` factors with `merge:`/`vectors:`: the (one) entry's operator over every vector, as
    `svd_rank`'s settings (α rules and the schedule stay with the runs, `lowrank_merge`); None: plain Δ."""
    m = r.merge[0] if r.merge else MergeSpec()
    c = dataclasses.replace(merge_configs(r.model_copy(update={"merge": (m,)}))[0], rules=(), schedule=None)
    return None if c.is_plain(len(r.vectors) or 1) else \
        dataclasses.replace(merge_options(m, r.vectors), rules=(), layer_schedule=None)


def _merge_field(where: str | None) -> str | None:
    """The `merge:` entry field an OptionsError names: `merge.<setting>`, or a flag (`--alpha-rule` → rules)."""
    if where and where.startswith("merge."):
        return where.removeprefix("merge.")
    flags = {f.metadata.get("flag") or "--" + f.name.replace("_", "-"): f.name for f in dataclasses.fields(MergeSpec)}
    return flags.get(where, where)


OUTPUT_KEYS = ("name",)
SWEEP_CHOOSES = ("alphas", "name_template", "overwrite", "progress")  # materialize fields a recipe may not set


class _Invalid(ValueError):
    """A validator's complaint: what, and what to do (kept through pydantic's ValidationError)."""

    def __init__(self, what: str, fix: str | None = None, field: str | None = None):
        super().__init__(what)
        self.what, self.fix, self.field = what, fix, field


class _RecipeFields(BaseModel):
    """The recipe schema (`Recipe` adds only the Python constructor's error handling)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Name of the run (used in the default output folder).")
    base: str = Field(description="θ1: a model folder or Hub id (relative paths: from the recipe's folder).")
    reasoner: str = Field(description="θ2: a model folder or Hub id (or give vectors).")
    vectors: tuple[VectorSpec, ...] = Field((), description="Several task vectors of the base, with weights "
                                                            "(the first is the reasoner).")
    merge: tuple[MergeSpec, ...] = Field((), description="Merge operator(s) over the vectors: one mapping or a list.")
    alphas: tuple[float, ...] = Field((), description="α values to evaluate.")
    datasets: tuple[DatasetSpec, ...] = Field(description="Evaluation datasets.")
    apply: Literal["swap", "materialize", "lora"] = Field(
        "swap", description="How α is applied: swap = θ1 + αΔ loaded into one running engine; materialize = "
                            "folders on disk; lora = one LoRA adapter per α (needs low_rank).")
    low_rank: LowRankOptions | None = Field(None, description="Replace Δ by a low-rank approximation first.")
    source: SourceOptions = Field(SourceOptions(), description="How Δ is read: vocab (error | intersect: merge over "
                                                               "the shared vocabulary rows), allow_missing, "
                                                               "allow_pickle (the source flags of the verbs).")
    materialize: MaterializeOptions = Field(
        MaterializeOptions(), description="How θ1 + αΔ is built: include/exclude select the tensors α moves for "
                                          "apply: swap (in-engine) and apply: materialize alike; the rest apply "
                                          "to the α folders written on disk.")
    prompt: PromptOptions = Field(PromptOptions(), description="Prompt settings.")
    sampling: SamplingOptions = Field(SamplingOptions(), description="Decoding settings.")
    engine: EngineOptions = Field(EngineOptions(), description="vLLM engine settings.")
    params_b: float | None = Field(None, description="Nominal size in billions for ACU (default: counted).")
    answer_rule: Literal["paper", "boxed-only", "strict-match", "flexible-extract"] = Field(
        "paper", description="How answers are read (tvtool.evaluation.scoring): paper (A.1), boxed-only, strict-match, "
                             "flexible-extract.")
    prompt_budgets: tuple[int, ...] = Field((), description="Token budgets for the prompt-control baseline "
                                                            "(Table 12), e.g. [20, 50].")
    budget_template: Literal["qwq", "llama"] = Field("qwq", description="The paper's budget prompt (appendix B).")
    budget_alpha: float = Field(1.0, description="α of the budget-prompt runs (1: the reasoner).")
    keep: KeepSpec = Field(KeepSpec(), description="What to keep on disk.")
    push: PushStage = Field(PushStage(), description="What to push (private, and a dry run, by default).")
    executor: ExecutorSpec = Field(ExecutorSpec(), description="Where the evaluation runs (executor.ray: a Ray pool).")
    output: str = Field("runs/{name}", description="Output folder; {name} is the recipe's name.")
    mixchain: MixChainSpec | None = Field(None, description="Build MixChain-Z from θ1 + αΔ (CoT-Valve §3.2).")
    train: tuple[TrainSpec, ...] = Field((), description="Valves to train (valve, valve++, progressive) and "
                                                         "sweep over α.")

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        bad = [a for a in v if not math.isfinite(a)]
        if bad:
            raise _Invalid(f"must be finite numbers, got {bad[0]}")
        return v

    @field_validator("datasets")
    @classmethod
    def _datasets(cls, v: tuple[DatasetSpec, ...]) -> tuple[DatasetSpec, ...]:
        if not v:
            raise _Invalid("must list at least one dataset", "e.g. datasets: [{name: gsm8k}]")
        return v

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        try:
            keys = [k for _, k, _, _ in string.Formatter().parse(v) if k is not None]
        except ValueError as e:
            raise _Invalid(f"is not a valid template: {e}", "write braces as {{ and }}") from None
        for k in keys:
            if k not in OUTPUT_KEYS:
                raise _Invalid(f"has an unknown key {{{k}}}", f"known keys: {', '.join('{' + x + '}' for x in OUTPUT_KEYS)}")
        return v

    @field_validator("materialize")
    @classmethod
    def _materialize(cls, v: MaterializeOptions) -> MaterializeOptions:
        default = MaterializeOptions()
        for k in SWEEP_CHOOSES:
            if getattr(v, k) != getattr(default, k):
                raise _Invalid("is chosen by the sweep", f"remove materialize.{k}", k)
        for k in ("include", "exclude"):
            try:
                re.compile(getattr(v, k) or "")
            except re.error as e:
                raise _Invalid(f"is not a valid regular expression: {e}", field=k) from None
        return v

    @model_validator(mode="after")
    def _stages(self) -> _RecipeFields:
        lr = self.low_rank
        for k in ("include", "exclude"):
            if getattr(self.materialize, k) is not None and self.apply == "lora":
                raise _Invalid("does not apply to apply: lora", "select tensors with low_rank.include/exclude "
                               "instead", f"materialize.{k}")
        if not self.alphas and not all(m.alphas for m in self.merge or (MergeSpec(),)):
            raise _Invalid("must list at least one α", "e.g. alphas: [0, 0.5, 1]", "alphas")
        if len(self.merge) > 1 and (lr is not None or self.mixchain is not None):  # one M for these stages
            stage = "low_rank" if lr is not None else "mixchain"
            raise _Invalid(f"lists several operators, but {stage} uses one merged task vector",
                           f"give one merge entry, or drop {stage}", "merge")
        if (self.merge or len(self.vectors) > 1) and self.apply == "lora":
            raise _Invalid("(or several vectors) does not apply to apply: lora", "use apply: swap or materialize",
                           "merge")
        for i, m in enumerate(self.merge):
            try:
                merge_configs(self.model_copy(update={"merge": (m,)}))
            except OptionsError as e:
                raise _Invalid(f"is invalid: {e.what}", e.fix, f"merge[{i}].{_merge_field(e.where)}") from None
        if self.prompt_budgets and self.apply != "swap":
            raise _Invalid("needs apply: swap", "use apply: swap, or remove prompt_budgets", "prompt_budgets")
        if self.apply == "lora" and lr is None:
            raise _Invalid("is 'lora' but low_rank is not set", "add low_rank: {rank: N}, or use apply: swap", "apply")
        if lr is not None and (lr.rank is None) == (lr.energy is None):
            raise _Invalid("needs exactly one of rank and energy", field="low_rank")
        if lr is not None and (lr.peft is not None or lr.peft_alpha != LowRankOptions().peft_alpha):
            raise _Invalid("sets peft/peft_alpha, which the sweep chooses", "use apply: lora for one adapter per α",
                           "low_rank")
        try:  # the CoT-Valve stages (tvtool.sweep.valve_spec)
            check_valve_stages(mixchain=self.mixchain, train=self.train)
        except OptionsError as e:
            raise _Invalid(e.what, e.fix, e.where) from None
        return self


class Recipe(_RecipeFields):
    """A validated sweep recipe (frozen). Built in Python, a bad field raises one RecipeError line."""

    def __init__(self, **data: Any) -> None:
        # A custom __init__ makes pydantic route every validation through it, in lax Python mode;
        # files are therefore checked on `_RecipeFields` (strict JSON mode) in `load_recipe`.
        try:
            super().__init__(**_normalize(data, "Recipe(...)"))
        except pydantic.ValidationError as e:
            raise _recipe_error(e.errors()[0], "Recipe(...)") from None


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe; relative model/dataset paths are resolved from its folder."""
    path = Path(path)
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise RecipeError(f"the recipe must be a mapping of fields, got {_show(data)}", where=str(path))
    try:
        # YAML data is JSON data; strict JSON mode checks it with JSON's types (see the module docstring).
        checked = _RecipeFields.model_validate_json(json.dumps(_normalize(data, str(path)), default=str), strict=True)
    except pydantic.ValidationError as e:
        raise _recipe_error(e.errors()[0], str(path)) from None
    r = Recipe.model_construct(checked.model_fields_set, **dict(checked))  # already validated
    here = path.resolve().parent

    def local(v: str) -> str:
        return str((here / v).resolve()) if not Path(v).is_absolute() and (here / v).exists() else v

    ds = tuple(dataclasses.replace(d, name=local(d.name)) for d in r.datasets)
    vs = tuple(dataclasses.replace(v, model=local(v.model)) for v in r.vectors)
    mc = dataclasses.replace(r.mixchain, dataset=local(r.mixchain.dataset)) if r.mixchain else None
    tr = tuple(dataclasses.replace(t, data=t.data if t.data == "mixchain" else local(t.data),
                                   model=t.model if t.model in ("reasoner", "base") else local(t.model))
               for t in r.train)
    return r.model_copy(update={"base": local(r.base), "reasoner": local(r.reasoner), "datasets": ds, "vectors": vs,
                                "mixchain": mc, "train": tr})


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise RecipeError(f"duplicate key {key!r} on line {key_node.start_mark.line + 1}",
                                  fix="give each field once")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise RecipeError("recipe not found", where=str(path), fix="check the path") from None
    except IsADirectoryError:
        raise RecipeError("recipe is a folder, not a file", where=str(path), fix="pass the .yaml file") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})",
                          where=str(path), fix="save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except RecipeError as e:
        raise RecipeError(e.what, where=str(path), fix=e.fix) from None
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe is not valid YAML: {str(e).splitlines()[0]}", where=str(path)) from None


_WHAT = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
         "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
         "bool_parsing": "true or false", "string_type": "a string", "tuple_type": "a list", "list_type": "a list",
         "dataclass_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
         "dict_type": "a mapping"}


def _recipe_error(err: dict, file: str) -> RecipeError:
    """One pydantic error → one RecipeError line naming the field path."""
    loc, kind, given = err["loc"], err["type"], err.get("input")
    where = _path(loc)
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        known = [n for n in _fields(_annotation(loc[:-1]))]
        home = [k for k in known if len(loc) == 1 and loc[0] in _fields(_annotation((k,)))]
        fix = (f"it belongs in a section: {' or '.join(f'{k}.{loc[0]}' for k in home)}" if home
               else f"known fields: {', '.join(known)}")
        return RecipeError(f"unknown field {where}", where=file, fix=fix)
    if kind in ("missing", "missing_argument"):
        return RecipeError(f"missing field {where}", where=file)
    if kind == "literal_error":
        choices = ", ".join(map(str, typing.get_args(unwrap_optional(_annotation(loc))[0])))
        return RecipeError(f"field {where} must be one of {choices}, got {_show(given)}", where=file)
    if kind in _WHAT:
        if given is None:
            return RecipeError(f"field {where} must not be empty", where=file)
        return RecipeError(f"field {where} must be {_WHAT[kind]}, got {_show(given)}", where=file)
    bad = (err.get("ctx") or {}).get("error")
    if isinstance(bad, _Invalid):
        where = _path((*loc, bad.field) if bad.field else loc)
        return RecipeError(f"field {where} {bad.what}", where=file, fix=bad.fix)
    return RecipeError(f"field {where}: {err['msg']}", where=file)


def _annotation(loc: tuple) -> Any:
    """The type at a field path of `Recipe` (list indices step into the element type)."""
    tp: Any = _RecipeFields
    for part in loc:
        tp = unwrap_optional(tp)[0]
        if isinstance(part, int):
            tp = typing.get_args(tp)[0]
        else:
            tp = typing.get_type_hints(tp)[part]
    return tp


def _fields(tp: Any) -> list[str]:
    tp = unwrap_optional(tp)[0]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return [f.name for f in dataclasses.fields(tp)] if dataclasses.is_dataclass(tp) else []


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _show(v) -> str:
    return repr(v) if not isinstance(v, (dict, list)) else type(v).__name__


def to_dict(r: Recipe) -> dict:
    """The recipe as plain data (for recipe.yaml, REPORT.md and report.json)."""
    return r.model_dump(mode="json")
