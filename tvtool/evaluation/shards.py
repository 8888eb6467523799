"""A run (one α on one dataset) cut into shards of problems, for a pool of engines (tvtool.evaluation.cluster).

The engine that takes a shard switches to the run's α in place (resident after its first α) and appends
the shard's samples to `<run>/.shards/<start>-<stop>.jsonl`, batch by batch, fsynced, as `runs.run_one`
appends to samples.jsonl. When every shard of a run is done, `runs.merge_shards` writes samples.jsonl in
the order one engine writes it (problems in order, each problem's samples by index), atomically, and
removes the shard files; the run is then finished as one engine finishes it (`runs.finish_run`: scores,
summary.json, run.json with its finished-work record, last). One engine resuming such a run merges first
too. A sample already in samples.jsonl or in any shard file is never generated again, so a killed engine's
shard, retried, resumes, and so does a re-plan with other shard bounds.
"""

from __future__ import annotations

from pathlib import Path

from tvtool.engine.engine import Engine
from tvtool.engine.options import SamplingOptions
from tvtool.engine.prompting import PromptOptions
from tvtool.evaluation.data import ProblemSet
from tvtool.evaluation.results import read_samples
from tvtool.evaluation.runs import EvalOptions, generate_samples
from tvtool.io.layout import SAMPLES, SHARDS


def shard_file(folder: str | Path, start: int, stop: int) -> Path:
    return Path(folder) / SHARDS / f"{start:06d}-{stop:06d}.jsonl"


def written(folder: str | Path, *, but: Path | None = None) -> set[tuple[str, int]]:
    """(id, index) of every sample in samples.jsonl and the shard files (`but` aside; complete lines only:
    another engine may be appending to its own)."""
    folder = Path(folder)
    files = [folder / SAMPLES, *sorted((folder / SHARDS).glob("*.jsonl"))]
    return {(r["id"], r["index"]) for f in files if f != but for r in read_samples(f)}


def generate_shard(*, engine: Engine, folder: str | Path, problems: ProblemSet, start: int, stop: int,
                   prompt: PromptOptions, sampling: SamplingOptions, options: EvalOptions, lora=None) -> None:
    """Generate problems[start:stop] (what no file of the run holds yet) into this shard's file."""
    path = shard_file(folder, start, stop)
    path.parent.mkdir(parents=True, exist_ok=True)
    generate_samples(engine=engine, problems=problems.problems[start:stop], kind=problems.kind, path=path,
                     prompt=prompt, sampling=sampling, options=options, lora=lora,
                     done=written(folder, but=path), desc=f"{Path(folder).parent.name} {Path(folder).name}")
