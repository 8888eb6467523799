"""What `tvtool sweep RECIPE --plan` knows without running anything, and what a stage's `plan` hook returns.

Models are read by their safetensors headers (a folder, or a Hub id whose snapshot is in the local Hugging Face
cache); a model whose weights are not at hand (a folder or cached snapshot holding config.json alone) is planned
from config.json: the parameter shapes its architecture gives (`tvtool.valve.plan.Arch.tensor_shapes`), as a
header-only `Checkpoint` that the merge plan, the delta plan and the SVD selection read like any other, and the
plan says so. Nothing is downloaded, no engine starts, no file or folder is written.

A stage's plan (`StagePlan`): its disk (`Size`: bytes it writes, exact or an estimate, said which), its memory
(`Memory`: a streaming pass's RAM, an engine's GPU or RAM, a training process), whether it is finished
(`Status`: by the same finished-work records the sweep checks, `tvtool.io.finished`), and notes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from huggingface_hub import try_to_load_from_cache

from tvtool.errors import CheckpointError, TvtoolError
from tvtool.evaluation.data import BUNDLED, ProblemSet, load_problems
from tvtool.io.checkpoint import Checkpoint, Source, local_only, model_config
from tvtool.io.finished import finished_state
from tvtool.io.layout import DTYPES, INDEX, parse_hub_ref
from tvtool.io.safetensors_io import TensorInfo
from tvtool.merge.config import MergeConfig
from tvtool.valve.plan import ARCHES, Arch
from tvtool.vectors.source import DeltaSource, Opened

GiB = 2**30
ID_BYTES = 2  # a token id in samples.jsonl's token_ids list: its digits plus ", "
TEXT_BYTES = 5  # a generated token's text in the response, JSON-escaped (measured on the toy sweep: 5.2)
SAMPLE_BYTES = 600  # a sample's other fields (id, gold, extracted, thinking counts, …), besides the prompt


# --- the plan's data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """Bytes a stage writes: `exact` (the tensors' bytes, from the plan of what is written), or an estimate
    (`note` says what it rests on); None: unknown (`note` says why)."""

    what: str
    bytes: int | None
    exact: bool = True
    note: str = ""


@dataclass(frozen=True)
class Memory:
    """A stage's peak memory on one device: `lines` the plan by component; `fits` against `limit` (None:
    not checked); `fix` the smallest change that fits."""

    what: str
    peak: int | None
    limit: int | None
    lines: tuple[str, ...] = ()
    fits: bool | None = None
    fix: str | None = None
    data: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Status:
    """finished (the sweep skips it), to do (nothing there), partly finished, redo (its outputs hold other
    settings or inputs: `detail` says which), unknown (`detail` says why), or nothing to run."""

    state: str
    detail: str = ""

    def text(self) -> str:
        return self.state + (f": {self.detail}" if self.detail else "")


@dataclass
class StagePlan:
    name: str
    status: Status = Status("to do")
    disk: list[Size] = field(default_factory=list)
    memory: list[Memory] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)  # filled by the planner from the stage's `commands`

    def to_dict(self) -> dict:
        d = asdict(self)
        d["status"] = {"state": self.status.state, "detail": self.status.detail}
        return d


# --- models without their weights -------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedModel:
    ref: str
    checkpoint: Checkpoint  # headers, or shapes from config.json (no tensor file behind them)
    config: dict
    from_config: bool
    where: str


def plan_model(ref: str) -> PlannedModel:
    """A model as `--plan` sees it: its headers when the weights are at hand, else its config.json's shapes.
    One CheckpointError line when neither is (a Hub id is looked up in the local cache only)."""
    src = _source(ref)
    if _has_weights(src.path):
        with local_only():
            ck = Checkpoint.open(src)
        return PlannedModel(ref, ck, ck.config(), False, str(src.path))
    folder = src.path if src.path.is_dir() else src.path.parent
    if not (folder / "config.json").is_file():
        raise CheckpointError("cannot be planned: no weights and no config.json", where=ref,
                              fix="give a model folder (only the safetensors headers are read) or one with "
                                  "its config.json")
    cfg = model_config(folder / "config.json")
    return PlannedModel(ref, config_checkpoint(cfg, src), cfg, True, str(folder / "config.json"))


def _source(ref: str) -> Source:
    """Where `ref` is on this machine: a path, or a Hub id's snapshot in the local HF cache (found by its
    config.json; never fetched)."""
    if os.path.exists(ref):
        return Source(Path(ref), ref)
    hub = parse_hub_ref(ref)
    if hub is None:
        raise CheckpointError("model not found", where=ref, fix="give a model folder or a Hub id like org/name")
    repo_id, revision = hub
    cfg = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(cfg, str):
        raise CheckpointError("cannot be planned: not in the local Hugging Face cache, and --plan downloads "
                              "nothing", where=ref,
                              fix=f"fetch its config.json (huggingface-cli download {repo_id} config.json; that is "
                                  "enough to plan) or the model, or give a local folder")
    snap = Path(cfg).parent
    return Source(snap, ref, repo_id, snap.name)


def _has_weights(path: Path) -> bool:
    """Whether the safetensors weights are all here (an HF cache snapshot may hold config.json alone)."""
    if path.is_file():
        return path.suffix == ".safetensors"
    if (path / INDEX).is_file():
        try:
            files = set(json.loads((path / INDEX).read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            return True  # a damaged index: Checkpoint.open names it
        return all((path / f).is_file() for f in files)
    return any(path.glob("*.safetensors"))


def config_checkpoint(cfg: dict, src: Source) -> Checkpoint:
    """A header-only Checkpoint with the parameter shapes that `cfg` (a config.json) gives, in its dtype."""
    where = src.ref
    if (cfg.get("text_config", cfg)).get("model_type") not in ARCHES:
        raise CheckpointError(f"cannot be planned from config.json alone: model type "
                              f"{cfg.get('model_type')!r} is not one whose shapes the planner derives "
                              f"({', '.join(ARCHES)})", where=where,
                              fix="give the model's weights (only their safetensors headers are read)")
    arch = Arch.from_config(cfg, where=where)
    name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    dtype = DTYPES.get(name)
    if dtype is None:
        raise CheckpointError(f"config.json's dtype {name!r} is not float32, bfloat16 or float16", where=where,
                              fix="give the model's weights (only their safetensors headers are read)")
    cfgf = (src.path if src.path.is_dir() else src.path.parent) / "config.json"
    infos = {n: TensorInfo(cfgf, dtype, s, 0, math.prod(s) * dtype.itemsize) for n, s in arch.tensor_shapes().items()}
    return Checkpoint(src, infos, {})


# --- the context a stage plans in -------------------------------------------------------------------


@dataclass
class PlanContext:
    """The recipe as the sweep would run it (overrides applied), the machine planned for, and the inputs."""

    recipe: Any  # the validated recipe (`tvtool.sweep.recipe.Recipe`)
    out: Path  # the output folder (not created)
    alphas: tuple[float, ...]
    configs: list[MergeConfig]
    gpus: int  # GPUs planned for (--gpus; default 1)
    gpu_memory: int | None  # bytes per GPU (--gpu-memory, else this machine's GPU); None: engines run on a CPU
    ram: int  # this machine's memory
    overwrite: bool = False
    ray: Any = None  # the Ray pool an α sweep runs on (`tvtool.evaluation.units.RayOptions`), or None
    _models: dict[str, PlannedModel] = field(default_factory=dict, repr=False)

    def model(self, ref: str) -> PlannedModel:
        ref = str(ref)
        if ref not in self._models:
            self._models[ref] = plan_model(ref)
        return self._models[ref]

    def checkpoint(self, ref: str) -> Checkpoint:
        return self.model(ref).checkpoint

    def open(self, source: DeltaSource) -> Opened:
        """θ1 and the task vectors of `source`, headers only (shapes from config.json where weights are absent)."""
        with local_only():
            return source.open(checkpoints=self.checkpoint)

    def derived(self, *refs: str) -> list[str]:
        """Those of `refs` planned from config.json alone."""
        return [r for r in refs if r and self.model(r).from_config]

    def shapes_note(self, *refs: str) -> list[str]:
        """The plan's note when shapes come from config.json."""
        d = self.derived(*refs)
        return [f"{', '.join(d)}: weights not at hand, shapes derived from config.json (the architecture's "
                "parameter shapes; sizes exact for such a checkpoint)"] if d else []

    # -- finished work --------------------------------------------------------------------------------
    def status(self, outputs: Iterable[tuple[Path, Callable[[], dict], str | None]]) -> Status:
        """Where outputs (path, its record, made only if the path exists; the record's file name) stand, as
        the sweep's `is_finished` would find them."""
        outputs = list(outputs)
        states = []
        for path, record, name in outputs:
            if not Path(path).exists():
                states.append(("absent", ""))
                continue
            try:
                with local_only():
                    states.append(finished_state(path, record(), name=name))
            except TvtoolError as e:
                return Status("unknown", f"{e.what} ({e.where})" if e.where else e.what)
        return self.combine([s == "finished" for s, _ in states], sum(s != "absent" for s, _ in states),
                            [c for s, c in states if s == "changed"])

    def combine(self, done: list[bool], present: int, changes: list[str] = (), unit: str = "") -> Status:
        """One status from per-output results: `done` (finished or not), how many are present at all."""
        n, k = len(done), sum(done)
        what = f" {unit}" if unit else ""
        if n and k == n:
            return Status("redo", "finished, but --overwrite discards it") if self.overwrite else Status("finished")
        if present == 0:
            return Status("to do")
        detail = f"{k} of {n}{what} finished" if n > 1 else ""
        if changes:
            detail += ("; " if detail else "") + f"other settings or inputs: {changes[0]}"
        return Status("partly finished" if k else "redo" if changes else "resumes", detail)

    # -- datasets -------------------------------------------------------------------------------------
    def problems(self, *, name: str, split: str, limit: int | None, seed: int | None,
                 kind: str | None) -> ProblemSet | None:
        """A local (bundled or file) dataset's problems; None for a Hub dataset or a missing file (not fetched)."""
        if name not in BUNDLED and not Path(name).expanduser().exists():
            return None
        return load_problems(dataset=name, split=split, limit=limit, seed=seed, kind=kind)


def samples_bytes(*, problems: ProblemSet | None, n: int, max_tokens: int, vocab: int, runs: int = 1) -> Size:
    """An upper estimate of samples.jsonl: every sample at max_tokens (chains usually end long before)."""
    if problems is None:
        return Size("samples.jsonl", None, False, "dataset not at hand here (a Hub id or a missing file): size "
                                                    "unknown")
    per_token = TEXT_BYTES + len(str(max(1, vocab - 1))) + ID_BYTES
    prompts = sum(len(json.dumps(p.question)) for p in problems)
    total = runs * n * (prompts + len(problems) * (SAMPLE_BYTES + max_tokens * per_token))
    return Size(f"samples.jsonl, {runs} run{'s' * (runs > 1)} × {len(problems)} problems × {n}", total, False,
                f"at most: every sample at {max_tokens} tokens, ~{per_token} B per generated token (its text and "
                "id); chains that stop early write less")


__all__ = ["Memory", "PlanContext", "PlannedModel", "Size", "StagePlan", "Status", "config_checkpoint",
           "plan_model", "samples_bytes"]
