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

import torch
from huggingface_hub import try_to_load_from_cache

from tvtool.engine.memory import DTYPE_BYTES, engine_dtype, plan_engine
from tvtool.engine.placement import held_bytes
from tvtool.errors import CheckpointError, TvtoolError
from tvtool.evaluation.data import BUNDLED, ProblemSet, load_problems
from tvtool.io.checkpoint import Checkpoint, Source, local_only, model_config
from tvtool.io.finished import finished_state
from tvtool.io.layout import DTYPES, INDEX, dtype_name, parse_hub_ref
from tvtool.io.safetensors_io import ROW_CHUNK, TensorInfo
from tvtool.merge.config import MergeConfig
from tvtool.merge.plan import output_plan
from tvtool.options import CliOptions, opt
from tvtool.valve.plan import ARCHES, Arch, parse_memory
from tvtool.vectors.source import DeltaSource, Opened

GiB = 2**30
ID_BYTES = 2  # a token id in samples.jsonl's token_ids list: its digits plus ", "
TEXT_BYTES = 5  # a generated token's text in the response, JSON-escaped (measured on the toy sweep: 5.2)
SAMPLE_BYTES = 600  # a sample's other fields (id, gold, extracted, thinking counts, …), besides the prompt


@dataclass(frozen=True)
class SweepPlanOptions(CliOptions):
    gpus: int = opt(1, "With --plan: training processes (GPUs) to plan each train entry for (as train --gpus).")
    gpu_memory: str | None = opt(None, "With --plan: memory per GPU, e.g. 80GiB or 24GB (default: this machine's "
                                       "GPU; none: the engines are planned on the CPU).")
    ram: str | None = opt(None, "With --plan: memory of each host, e.g. 1TiB (default: this machine's): where "
                                "the resident α swap's copies fit.")


def machine(options: SweepPlanOptions) -> tuple[int | None, int, str]:
    """(bytes per GPU or None for CPU engines, this machine's RAM, the words for them)."""
    ram = parse_memory(options.ram) if options.ram else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    host = f"host RAM {human(ram)} ({'--ram' if options.ram else 'this machine; --ram plans another'})"
    if options.gpu_memory is not None:
        gpu, where = parse_memory(options.gpu_memory), "--gpu-memory"
    elif torch.cuda.is_available():
        gpu, where = torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
    else:
        return None, ram, (f"no GPU here: engines planned on the CPU (--gpu-memory plans GPUs), {host}; "
                           f"training: {options.gpus} process(es) sharing the RAM")
    return gpu, ram, f"GPUs of {human(gpu)} ({where}), {host}; training: {options.gpus} process(es)"


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


@dataclass
class SweepPlan:
    """A recipe's plan: the machine it is planned for, the inputs and where their shapes came from, and
    each stage's plan in pipeline order."""

    recipe: str
    out: Path
    machine: str
    inputs: dict[str, str]  # ref → where its shapes were read (headers, or a config.json)
    stages: list[StagePlan]

    @property
    def disk(self) -> int | None:
        sizes = [d.bytes for p in self.stages for d in p.disk]
        return None if any(b is None for b in sizes) else sum(sizes)

    def fits(self) -> bool:
        return not any(m.fits is False for p in self.stages for m in p.memory)

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "output": str(self.out), "machine": self.machine, "inputs": self.inputs,
                "disk": self.disk, "fits": self.fits(), "stages": [p.to_dict() for p in self.stages]}

    def lines(self) -> list[str]:
        out = [f"plan of {self.recipe} → {self.out} (nothing run, written or downloaded)",
               f"  machine: {self.machine}"]
        out += [f"  input {ref}: {where}" for ref, where in self.inputs.items()]
        sizes = [d for p in self.stages for d in p.disk]
        known = sum(d.bytes for d in sizes if d.bytes is not None)
        unknown = sum(d.bytes is None for d in sizes)
        out.append(f"  disk, all stages: {'≤ ' if not all(d.exact for d in sizes) else ''}{human(known)}"
                   + (f" and {unknown} size(s) unknown (see the stages)" if unknown else ""))
        if not self.fits():
            out.append("  does not fit: " + ", ".join(p.name for p in self.stages if any(m.fits is False
                                                                                        for m in p.memory)))
        for i, p in enumerate(self.stages, 1):
            out += ["", f"[{i}] {p.name}: {p.status.text()}"]
            out += [f"  $ {c}" for c in p.commands]
            for d in p.disk:
                size = "size unknown" if d.bytes is None else (human(d.bytes) if d.exact else f"≤ {human(d.bytes)}")
                out.append(f"  disk: {d.what}: {size}" + (f" ({d.note})" if d.note else ""))
            for m in p.memory:
                out += [f"  memory: {m.lines[0]}", *(f"    {x.strip()}" if x.startswith("  ") else f"    {x}"
                                                     for x in m.lines[1:])] if m.lines else [f"  memory: {m.what}"]
                if m.fits is False and m.fix:
                    out.append(f"    fix: {m.fix}")
            out += [f"  note: {n}" for n in p.notes]
        return out


def human(n: int) -> str:
    """Bytes in the largest unit (B, KiB, MiB, GiB, TiB) that keeps the number ≥ 1."""
    for unit, k in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} B"


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
    configs: list[MergeConfig]  # as the run's state holds them (low_rank's plan replaces them, as its run does)
    source: DeltaSource  # where Δ comes from (low_rank's plan replaces it by the factored delta, as its run does)
    gpus: int  # training processes planned for (--gpus; default 1)
    gpu_memory: int | None  # bytes per GPU (--gpu-memory, else this machine's GPU); None: engines run on a CPU
    ram: int  # this machine's memory
    overwrite: bool = False
    ray: Any = None  # the Ray pool an α sweep runs on (`tvtool.evaluation.units.RayOptions`), or None
    _models: dict[str, PlannedModel] = field(default_factory=dict, repr=False)

    def plain(self) -> bool:
        """Whether every run is plain θ1 + α·Δ (`SweepState.plain`)."""
        return all(c.is_plain(len(self.source.more) + 1) for c in self.configs)

    def model(self, ref: str) -> PlannedModel:
        ref = str(ref)
        if ref not in self._models:
            self._models[ref] = plan_model(ref)
        return self._models[ref]

    def checkpoint(self, ref: str) -> Checkpoint:
        return self.model(ref).checkpoint

    def models(self) -> dict[str, PlannedModel]:
        """Every model planned so far, by ref."""
        return dict(self._models)

    def open(self, source: DeltaSource) -> Opened:
        """θ1 and the task vectors of `source`, headers only (shapes from config.json where weights are absent)."""
        with local_only():
            return source.open(checkpoints=self.checkpoint)

    def exists(self, source: DeltaSource) -> bool:
        """Whether every file `source` names is on disk (a factored delta an earlier stage writes may not be)."""
        return all(Path(p).exists() for p in (source.delta, *source.more) if p is not None) if \
            source.reasoner is None else True

    def engine(self, *, weights: int, dtype: str, config: dict, options: Any, lora: int = 0,
               resident: int | None = None) -> Memory:
        """An engine's memory (`tvtool.engine.memory.plan_engine`) on the GPUs (or the CPU) planned for."""
        m = plan_engine(weights=weights, dtype=dtype, config=config, options=options, gpu_memory=self.gpu_memory,
                        ram=self.ram, lora=lora, resident=resident)
        refused = m.resident is not None and m.resident["refused"]
        fix = None if m.fits is not False else "use resident: auto (streams what does not fit) or off" if refused \
            else ("raise tensor_parallel_size or gpu_memory_utilization, or lower "
                                                "max_model_len" if m.device == "GPU" else "lower cpu_kv_cache_gb")
        return Memory(f"vLLM engine ({m.device})", m.held + max(0, m.kv or 0), m.budget, tuple(m.lines()),
                      m.fits, fix, m.to_dict())

    def served(self, source: DeltaSource, options: Any, *, dtype: str = "auto", lora: int = 0,
               swap: Iterable[str] | None = None, pair: bool = False) -> Memory:
        """The memory of an engine serving θ1 + α·Δ of `source` (its shell model's tensors, `dtype` as stored
        or as materialized), or θ1 with `lora` bytes per LoRA slot. `swap`: the tensors an in-place α sweep's
        Δ reaches, whose resident copies (`--resident`) are planned too (None: no in-place α on this engine);
        `pair`: Δ is `source`'s plain base/reasoner pair (the copies are θ2 as stored, else a float32 M)."""
        opened = self.open(source)
        plan = output_plan(opened.base, opened.tv, dtype=dtype)
        numel = sum(math.prod(p.shape) for p in plan)
        stored = max(plan, key=lambda p: math.prod(p.shape) * p.dtype.itemsize).dtype  # the bulk's dtype
        edt = engine_dtype(options, dtype_name(stored))
        share = options.tensor_parallel_size * options.pipeline_parallel_size if self.gpu_memory else 1
        resident = None
        if swap is not None:
            reaches = set(swap)
            end = self.checkpoint(source.reasoner) if pair else None
            resident = sum(held_bytes(numel=math.prod(p.shape) // share, itemsize=p.dtype.itemsize,
                                      in_delta=p.name in reaches,
                                      paired=pair and p.name in end and end.info(p.name).dtype == p.dtype
                                      and tuple(end.info(p.name).shape) == tuple(p.shape)) for p in plan)
        return self.engine(weights=numel * DTYPE_BYTES[edt], dtype=edt, config=self.model(source.base).config,
                           options=options, lora=lora, resident=resident)

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

    def status_of(self, find: Callable[[], Status]) -> Status:
        """`find()` with Hub ids resolved from the local cache only; what it cannot read makes it unknown."""
        try:
            with local_only():
                return find()
        except TvtoolError as e:
            return Status("unknown", str(e))

    def runs_status(self, states: list[str], *, unit: str = "") -> Status:
        """One status from per-output states: finished, resumes (same record, work left), changed, absent."""
        present = sum(s != "absent" for s in states)
        st = self.combine([s == "finished" for s in states], present,
                          ["their record differs (edited settings or inputs)"] * ("changed" in states), unit)
        return st

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


def streaming(what: str) -> Memory:
    """A streaming pass's memory: row chunks of at most `ROW_CHUNK` elements per input (fp32, with the output
    chunks and the write-behind queue), whatever the model's size: not planned by component."""
    return Memory(what, None, None, (f"{what}: streamed in row chunks of ≤ {ROW_CHUNK:,} elements "
                                     f"({ROW_CHUNK * 4 / 2**20:.0f} MiB in float32) per input; no whole tensor "
                                     "set, no whole model in memory",))


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


__all__ = ["Memory", "PlanContext", "PlannedModel", "Size", "StagePlan", "Status", "SweepPlan", "SweepPlanOptions", "config_checkpoint",
           "human", "machine", "plan_model", "samples_bytes", "streaming"]
