"""Several runs on one engine, one generate call per batch: the α sweep of a LoRA valve, in one pass.

Each run has its own LoRA adapter (an α-scaled adapter of a valve, `tvtool.lowrank.alpha_adapter`, or
any PEFT adapter; None: the engine's own weights). For every batch of `batch_size` problems the
prompts of ALL runs go to one `Engine.generate` call, with one adapter per prompt, so vLLM decodes the
α values side by side instead of one call (and one pass over the weights per step) per α. Each run
keeps its own folder, record and resumable samples (`tvtool.evaluation.runs.OpenRun`): the files are
those the runs would write one by one, and greedy token ids are the same (tests/evaluation).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

from tvtool.engine.engine import Engine
from tvtool.engine.logs import RunProgress
from tvtool.engine.prompting import PromptOptions
from tvtool.errors import OptionsError
from tvtool.evaluation.results import read_samples
from tvtool.evaluation.runs import OpenRun


def run_batched(*, engine: Engine, runs: Sequence[OpenRun], prompt: PromptOptions) -> list[dict]:
    """Generate what `runs` still miss, every run's batch in one call; then finish each run (its summary)."""
    if not runs:
        return []
    first = runs[0]
    if any((r.sampling, r.special, r.options.batch_size) != (first.sampling, first.special, first.options.batch_size)
           for r in runs):
        raise OptionsError("runs batched together need the same sampling, prompt format and batch size",
                           where=", ".join(r.desc for r in runs), fix="evaluate them separately")
    engine.reserve_loras(len({r.lora for r in runs if r.lora}))
    n, size = first.sampling.n, first.options.batch_size
    total = sum(r.total for r in runs)
    left = sum(len(r.todo) for r in runs) * n
    desc = f"{runs[0].folder.parent.name}…{runs[-1].folder.parent.name} {first.folder.name}" if len(runs) > 1 \
        else first.desc
    records = [rec for r in runs for rec in read_samples(r.path)]
    with RunProgress(desc=desc, total=total, done=total - left, disable=not first.options.progress,
                     records=records) as bar, contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(r.path, "a", encoding="utf-8")) for r in runs]
        for start in range(0, max(len(r.todo) for r in runs), size):
            chunks = [r.todo[start:start + size] for r in runs]
            texts = [engine.prompts(questions=[p.question for p in c], options=prompt) for c in chunks]
            outs = engine.generate(prompts=[t for ts in texts for t in ts], sampling=first.sampling,
                                   loras=[r.lora for r, ts in zip(runs, texts) for _ in ts],
                                   add_special_tokens=first.special)
            at = 0
            for r, f, c, ts in zip(runs, files, chunks, texts):
                bar.update(r.write(f, c, ts, outs[at:at + len(c)]), n=len(c) * n)
                at += len(c)
    return [r.finish() for r in runs]


__all__ = ["run_batched"]
