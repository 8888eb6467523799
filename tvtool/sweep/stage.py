"""What a sweep stage is: the interface, the registry, and the state the stages share.

A stage is one module in `tvtool/sweep/stages/` defining a `Stage` subclass decorated with `@register`;
the folder discovers its modules, so adding a stage is adding that one file. A stage says:
  - its name and place in the pipeline (`order`);
  - the recipe field it owns (`section`: name, type pydantic validates it with, default, help, its
    checks), which `tvtool.sweep.recipe` adds to the recipe schema;
  - what it reads and writes (`inputs`: refused as outputs before anything is written; `folders`:
    what `--overwrite` discards; `engines`: shared engines it uses);
  - how it runs (`run`: resumable, its outputs skipped when their finished-work record matches,
    `tvtool.io.finished`) and what it leaves for later stages in the `SweepState`;
  - the commands it contributes to REPORT.md (`commands`: the exact verbs it runs, from the recipe
    alone, no run needed) and any report lines or plots (`report`);
  - its plan (`plan`, for `sweep --plan`): the disk it will write, the memory it needs, and whether its
    outputs are finished, by the same records `run` checks.
Every hook but `run` reads the recipe only, so that a planning pass can ask each stage about its work
without running it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, TypeVar

from tvtool.merge.config import MergeConfig
from tvtool.sweep.planning import PlanContext, StagePlan, Status
from tvtool.vectors.source import DeltaSource

Recipe = Any  # a validated `tvtool.sweep.recipe.Recipe`: the shared fields (`tvtool.sweep.spec.RecipeCore`) and
# every stage's section, as attributes (named, not imported: the recipe is assembled from this registry)


VALVE_ENGINE = "valves"  # the shared engine of MixChain and the valves' α sweeps (θ + α·Δ loaded in place)


@dataclass(frozen=True)
class Section:
    """The recipe field a stage owns, e.g. `low_rank: {rank: 32}`.

    `type` is what pydantic validates the field with (strict JSON types, unknown fields named), usually a
    frozen options dataclass, `X | None` or `tuple[X, ...]`. `after` is the field it follows in recipe.yaml,
    REPORT.md and error messages (a field no recipe has: at the end)."""

    name: str
    type: Any
    default: Any
    help: str
    after: str
    check: Callable[[Recipe], None] | None = None  # what the type cannot say: raise spec.Invalid(what, fix, field)
    paths: Callable[[Any, Callable[[str], str]], Any] | None = None  # the value with each local path mapped


@dataclass
class Part:
    """What a stage adds to REPORT.md: lines above the result tables, lines below them, and PNG plots
    (name → the file to copy beside REPORT.md as <name>.png)."""

    headline: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plots: dict[str, Path] = field(default_factory=dict)


class _Engine(Protocol):
    starts: int

    def close(self) -> None: ...


E = TypeVar("E", bound=_Engine)


@dataclass
class SweepState:
    """One sweep's run: what it was given, and what each stage leaves for the stages after it."""

    recipe: Recipe  # the validated recipe
    recipe_path: Path | None  # the recipe file (None: built in Python)
    out: Path  # the sweep's output folder
    alphas: tuple[float, ...]  # the recipe's α, each once
    source: DeltaSource  # where Δ comes from; low_rank replaces it by the factored delta
    configs: list[MergeConfig]  # one per (operator, α) of the runs; low_rank's M holds the operator
    progress: bool = True
    verbose: bool = False
    ray: str | None = None  # `sweep --ray ADDRESS`: overrides the recipe's executor.ray address
    lowrank: dict | None = None  # low_rank: {factored, report, plot[, adapters]}
    adapters: dict | None = None  # low_rank with apply: lora: α → adapter folder
    folders: dict = field(default_factory=dict)  # models: α (or MergeConfig) → merged model folder
    tables: dict[str, list[dict]] = field(default_factory=dict)  # eval, train: table name → rows
    valves: dict = field(default_factory=dict)  # mixchain, train: what Table 1 reports on them
    engine_starts: int = 0
    _engines: dict[str, Any] = field(default_factory=dict, repr=False)

    def here(self) -> Path:
        """The folder REPORT.md names local paths from: the recipe's (for a recipe built in Python, the output's)."""
        return (self.recipe_path or self.out / "recipe.yaml").parent

    def plain(self) -> bool:
        """Whether every run is plain θ1 + α·Δ (no operator, one vector)."""
        return all(c.is_plain(len(self.source.more) + 1) for c in self.configs)

    def engine(self, key: str, make: Callable[[], E]) -> E:
        """The shared engine `key`, made by `make` on first use (engines start lazily, on the first run that
        is not finished); the sweep closes it after the last stage listing `key` in its `engines`."""
        if key not in self._engines:
            self._engines[key] = make()
        return self._engines[key]

    def release(self, key: str) -> None:
        """Close the shared engine `key` (if made), counting its starts."""
        eng = self._engines.pop(key, None)
        if eng is not None:
            self.engine_starts += eng.starts
            eng.close()

    def release_all(self) -> None:
        for key in list(self._engines):
            self.release(key)


class Stage:
    """One step of a sweep (subclass, set the class attributes, override the hooks that apply, `@register`)."""

    name: ClassVar[str]
    order: ClassVar[int]  # place in the pipeline, smaller first (gaps of 10 leave room for new stages)
    section: ClassVar[Section | None] = None  # the recipe field it owns
    folders: ClassVar[tuple[str, ...]] = ()  # output folders it owns (what `sweep --overwrite` discards)
    engines: ClassVar[tuple[str, ...]] = ()  # shared engines it uses (`SweepState.engine`)
    publish: ClassVar[bool] = False  # runs after REPORT.md is written (it publishes results)

    def runs(self, recipe: Recipe) -> bool:
        """Whether this recipe asks for the stage at all."""
        return True

    def inputs(self, recipe: Recipe) -> list[str]:
        """Local inputs it reads: the sweep refuses an output that is, contains or sits inside one of them,
        before writing anything."""
        return []

    def check(self, state: SweepState) -> None:
        """Refuse, before anything is written, what this run of the stage cannot do (an OptionsError)."""

    def run(self, state: SweepState) -> None:
        """Do the stage's work, skipping what is finished (same record, `tvtool.io.finished`), redoing what
        an edited setting or input reaches; leave results for later stages in `state`."""

    def commands(self, recipe: Recipe, out: Path) -> list[list[str]]:
        """The commands (as words) that do this stage's work by hand, every non-default option spelled;
        `recipe` names its inputs relative to the recipe's folder, `out` is the output folder from there."""
        return []

    def report(self, state: SweepState) -> Part | None:
        """What the stage adds to REPORT.md (None: nothing)."""
        return None

    def plan(self, ctx: PlanContext) -> StagePlan:
        """What a run of this stage would write (`disk`), hold (`memory`) and skip (`status`, by the records
        `run` checks), from the recipe and the inputs' headers or config.json: nothing runs, nothing is
        written, nothing is downloaded (`sweep --plan`). Its commands are added from `commands`."""
        return StagePlan(self.name, Status("nothing to run"))


_REGISTRY: dict[str, Stage] = {}


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: add the stage to the sweep (its section to the recipe schema)."""
    if cls.name in _REGISTRY:
        raise ValueError(f"two sweep stages are named {cls.name!r}: {type(_REGISTRY[cls.name]).__module__} "
                         f"and {cls.__module__}")
    _REGISTRY[cls.name] = cls()
    return cls


def registered() -> tuple[Stage, ...]:
    """Every registered stage, in pipeline order (`tvtool.sweep.stages.STAGES` once all are discovered)."""
    return tuple(sorted(_REGISTRY.values(), key=lambda s: (s.order, s.name)))


__all__ = ["Part", "Section", "Stage", "SweepState", "VALVE_ENGINE", "register", "registered"]
