"""The fields of a sweep recipe that every stage may read, and how they become merge configurations.

A recipe is these shared fields (θ1, θ2 or several task vectors, the operators, α, datasets, how α is
applied, prompt/sampling/engine settings, what to keep, the output) plus one section per stage that owns
one (`low_rank:`, `mixchain:`, `train:`, `push:`, `serve:` …, `tvtool.sweep.stage.Section`);
`tvtool.sweep.recipe` assembles the two into the validated `Recipe`. The fields nest the options the
verbs already define (`MaterializeOptions`, `PromptOptions`, `SamplingOptions`, `EngineOptions`), so a
field means the same thing in a recipe, on the command line and in Python.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
import typing
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tvtool.engine.options import EngineOptions, SamplingOptions
from tvtool.engine.prompting import PromptOptions
from tvtool.errors import OptionsError, RecipeError
from tvtool.evaluation.options import AnswerOptions
from tvtool.merge.options import MaterializeOptions
from tvtool.merge.config import MergeConfig
from tvtool.merge.options import MergeOptions, option_fields
from tvtool.options import opt
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


# --- merge operators: `merge:` and `vectors:` ----------------------------------------------------
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


def named_model(r: RecipeCore, name: str) -> str:
    """A model a section names: `reasoner` or `base` (the recipe's), or a model path or Hub id as given."""
    return {"reasoner": r.reasoner, "base": r.base}.get(name, name)


def normalize(data: dict, file: str) -> dict:
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


def delta_source(r: RecipeCore) -> DeltaSource:
    """The recipe's source of Δ: base, reasoner (or `vectors:`, the first being the reasoner) and `source:`
    (built by `DeltaSource.build`, as the CLI's source flags are)."""
    source, _ = DeltaSource.build(base=r.base, reasoner=None if r.vectors else r.reasoner,
                                  vectors=[(v.model, v.weight) for v in r.vectors], options=r.source)
    return source


def merge_configs(r: RecipeCore) -> list[MergeConfig]:
    """The recipe's `MergeConfig`s: one per (merge entry, α); plain θ1 + α·Δ without `merge:`."""
    out = []
    for m in r.merge or (MergeSpec(),):
        out += merge_options(m, r.vectors).configs(m.alphas or r.alphas, include=r.materialize.include,
                                                   exclude=r.materialize.exclude)
    return list(dict.fromkeys(out))


def low_rank_merge(r: RecipeCore) -> MergeOptions | None:
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


class Invalid(ValueError):
    """A validator's complaint: what, what to do, and the field path below the checked field (kept
    through pydantic's ValidationError, `tvtool.sweep.recipe` turns it into one RecipeError line)."""

    def __init__(self, what: str, fix: str | None = None, field: str | None = None):
        super().__init__(what)
        self.what, self.fix, self.field = what, fix, field


class RecipeCore(BaseModel):
    """The shared fields, in recipe order, and their checks (`tvtool.sweep.recipe.Recipe` adds the sections)."""

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
    eval: AnswerOptions = Field(AnswerOptions(), description="How responses are read: think_end (the thinking "
                                                             "delimiter), difficulty_field (per-level tables).")
    prompt_budgets: tuple[int, ...] = Field((), description="Token budgets for the prompt-control baseline "
                                                            "(Table 12), e.g. [20, 50].")
    budget_template: Literal["qwq", "llama"] = Field("qwq", description="The paper's budget prompt (appendix B).")
    budget_alpha: float = Field(1.0, description="α of the budget-prompt runs (1: the reasoner).")
    keep: KeepSpec = Field(KeepSpec(), description="What to keep on disk.")
    output: str = Field("runs/{name}", description="Output folder; {name} is the recipe's name.")

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        bad = [a for a in v if not math.isfinite(a)]
        if bad:
            raise Invalid(f"must be finite numbers, got {bad[0]}")
        return v

    @field_validator("datasets")
    @classmethod
    def _datasets(cls, v: tuple[DatasetSpec, ...]) -> tuple[DatasetSpec, ...]:
        if not v:
            raise Invalid("must list at least one dataset", "e.g. datasets: [{name: gsm8k}]")
        return v

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        try:
            keys = [k for _, k, _, _ in string.Formatter().parse(v) if k is not None]
        except ValueError as e:
            raise Invalid(f"is not a valid template: {e}", "write braces as {{ and }}") from None
        for k in keys:
            if k not in OUTPUT_KEYS:
                raise Invalid(f"has an unknown key {{{k}}}", f"known keys: {', '.join('{' + x + '}' for x in OUTPUT_KEYS)}")
        return v

    @field_validator("materialize")
    @classmethod
    def _materialize(cls, v: MaterializeOptions) -> MaterializeOptions:
        default = MaterializeOptions()
        for k in SWEEP_CHOOSES:
            if getattr(v, k) != getattr(default, k):
                raise Invalid("is chosen by the sweep", f"remove materialize.{k}", k)
        for k in ("include", "exclude"):
            try:
                re.compile(getattr(v, k) or "")
            except re.error as e:
                raise Invalid(f"is not a valid regular expression: {e}", field=k) from None
        return v

    @model_validator(mode="after")
    def _shared(self) -> RecipeCore:
        """What the field types cannot say about the shared fields (the sections check themselves after)."""
        for k in ("include", "exclude"):
            if getattr(self.materialize, k) is not None and self.apply == "lora":
                raise Invalid("does not apply to apply: lora", "select tensors with low_rank.include/exclude "
                              "instead", f"materialize.{k}")
        if not self.alphas and not all(m.alphas for m in self.merge or (MergeSpec(),)):
            raise Invalid("must list at least one α", "e.g. alphas: [0, 0.5, 1]", "alphas")
        if (self.merge or len(self.vectors) > 1) and self.apply == "lora":
            raise Invalid("(or several vectors) does not apply to apply: lora", "use apply: swap or materialize",
                          "merge")
        for i, m in enumerate(self.merge):
            try:
                merge_configs(self.model_copy(update={"merge": (m,)}))
            except OptionsError as e:
                raise Invalid(f"is invalid: {e.what}", e.fix, f"merge[{i}].{_merge_field(e.where)}") from None
        if self.prompt_budgets and self.apply != "swap":
            raise Invalid("needs apply: swap", "use apply: swap, or remove prompt_budgets", "prompt_budgets")
        return self


def one_merged_vector(r: RecipeCore, section: str) -> None:
    """Raise Invalid when `section` (a stage that uses one merged task vector) meets several `merge:` entries."""
    if len(r.merge) > 1:
        raise Invalid(f"lists several operators, but {section} uses one merged task vector",
                      f"give one merge entry, or drop {section}", "merge")


__all__ = ["DatasetSpec", "Invalid", "KeepSpec", "MergeSpec", "RecipeCore", "VectorSpec", "delta_source", "low_rank_merge",
           "merge_configs", "merge_options", "named_model", "normalize", "one_merged_vector"]
