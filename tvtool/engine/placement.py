"""Where the resident α swap keeps its copies: the GPU, (pinned) CPU memory, or nowhere (stream), decided
from what each worker needs and what is free, in one line (`choose`). No engine, no torch: the engine
decides here for all its workers before any weight is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tvtool.errors import OptionsError

Placement = Literal["gpu", "cpu"]
Mode = Literal["auto", "gpu", "cpu", "off"]
GIB = 1 << 30


@dataclass(frozen=True)
class Choice:
    placement: Placement | None  # None: stream every α
    message: str | None  # one line to show, or None
    refused: bool = False


def choose(*, mode: Mode, need: int, free_gpu: int | None, free_cpu: int, workers_per_host: int = 1,
           reserve: float = 0.1) -> Choice:
    """Where the resident copies go. `need`: bytes per worker; `free_gpu`: free bytes of one worker's GPU
    (None without a GPU); `free_cpu`: available bytes of the host, shared by its `workers_per_host`.
    A `reserve` fraction of free memory stays free. `gpu`/`cpu` that do not fit are refused (one line);
    `auto` takes the GPU if it fits, else (pinned) CPU memory, else streams and says so."""
    if mode == "off":
        return Choice(None, None)
    gpu_ok = free_gpu is not None and need <= (1 - reserve) * free_gpu
    cpu_ok = need * workers_per_host <= (1 - reserve) * free_cpu
    size = f"{need / GIB:.2f} GiB per worker"
    gpu_free = f"{free_gpu / GIB:.1f} GiB free on its GPU" if free_gpu is not None else "no GPU"
    cpu_free = f"{free_cpu / GIB:.1f} GiB free in CPU memory for {workers_per_host} worker(s)"
    if mode == "gpu":
        if free_gpu is None:
            return Choice(None, "--resident gpu needs a GPU engine; this engine runs on the CPU", refused=True)
        return Choice("gpu", None) if gpu_ok else Choice(
            None, f"--resident gpu needs {size}, {gpu_free}", refused=True)
    if mode == "cpu":
        return Choice("cpu", None) if cpu_ok else Choice(None, f"--resident cpu needs {size}, {cpu_free}",
                                                         refused=True)
    if mode != "auto":
        raise OptionsError(f"bad --resident {mode!r}", where="--resident", fix="use auto, gpu, cpu or off")
    if gpu_ok:
        return Choice("gpu", f"resident α swap: θ1 and Δ kept in GPU memory ({size}, {gpu_free})")
    if cpu_ok:
        where = "pinned CPU memory" if free_gpu is not None else "CPU memory"
        return Choice("cpu", f"resident α swap: θ1 and Δ kept in {where} ({size}, {cpu_free})")
    return Choice(None, f"resident α swap does not fit ({size}; {gpu_free}, {cpu_free}): every α streams "
                        "from the checkpoints")


def held_bytes(*, numel: int, itemsize: int, in_delta: bool, paired: bool) -> int:
    """What the resident swap keeps for `numel` elements of one tensor stored with `itemsize` bytes: θ1 as
    stored; plus θ2 as stored where Δ comes from a single pair (`paired`), else a float32 M (an upper bound:
    M is kept in bf16 where exact); a tensor Δ does not reach keeps θ1 only. `Resident.need` sums it over a
    worker's regions; `sweep --plan` over a worker's share of the tensors."""
    return numel * (itemsize + (0 if not in_delta else itemsize if paired else 4))


def free_cpu_bytes() -> int:
    """MemAvailable of this host (Linux), else 0."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
