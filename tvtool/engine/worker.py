"""The methods vLLM adds to each of its workers (`worker_extension_cls`): in-place weight loads.

Called through `collective_rpc` by `tvtool.engine.engine.Engine`; they run in the worker
process, build the weights there from paths, so no tensor crosses a process boundary:

    Engine.load_alpha → collective_rpc("tvtool_load_alpha", source, config, placement)
      placement None (streaming): tvtool.merge.stream.merged_tensors → reload_weights
      placement "gpu"/"cpu" (resident): tvtool.engine.resident.Resident.values (θ1 and θ2/M captured on
        the first α, in the engine's layout found by tvtool.engine.vllm_layout.bake) → vllm_layout.swap

The opened inputs (headers and the task vector's plan) are kept per worker for the last
source, so a sweep does not re-open and re-plan them for every α; so is the resident capture.
Each load reports its seconds, the bytes this worker read (/proc/self/io) and the path it took.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Iterator

import torch

from tvtool.engine.placement import free_cpu_bytes
from tvtool.engine.resident import Region, Resident
from tvtool.engine.vllm_layout import Digests, bake, check_api, io_counters, swap
from tvtool.io.checkpoint import Checkpoint
from tvtool.merge.config import MergeConfig
from tvtool.merge.plan import output_plan
from tvtool.merge.stream import merged_tensors
from tvtool.vectors.source import DeltaSource

_opened: dict[tuple, tuple] = {}  # this worker's last opened (source, stamp) → (θ1, Δ)


class _State:
    """This worker's resident swap: the baked layout (per plan), the capture (per source), digests."""

    layout = None  # (plan key, tvtool.engine.vllm_layout.Layout)
    resident = None  # tvtool.engine.resident.Resident
    digests = None  # tvtool.engine.vllm_layout.Digests, when asked for


_state = _State()


class WorkerExtension:
    """Mixed into vLLM's worker class; `self.reload_weights` is the worker's own."""

    def tvtool_check(self) -> dict:
        """vLLM's version and the names the in-place swaps need that it lacks (checked at engine start)."""
        import vllm  # vLLM is optional: this runs only inside its worker

        return {"vllm": getattr(vllm, "__version__", None), "missing": check_api(self)}

    def tvtool_resident_need(self, source: dict, config: dict) -> dict:
        """What the resident swap of `source` needs here, and what is free: bytes per worker, GPU, host."""
        src, cfg = DeltaSource.from_dict(source), MergeConfig.from_dict(config)
        res = _resident(self, src)
        free_gpu = torch.cuda.mem_get_info(res.device)[0] if res.device.type == "cuda" else None
        return {"need": max(0, res.need(cfg) - res.nbytes), "held": res.nbytes, "free_gpu": free_gpu,
                "free_cpu": free_cpu_bytes(), "host": socket.gethostname(), "notice": _state.layout[1].notice()}

    def tvtool_load_alpha(self, source: dict, config: dict, placement: str | None = None) -> dict:
        """Load θ1 + α·Δ into this worker: streamed (`placement` None) or resident ("gpu"/"cpu")."""
        src, cfg = DeltaSource.from_dict(source), MergeConfig.from_dict(config)
        t0, io0 = time.perf_counter(), io_counters()
        if placement is None:
            base, tvs = _open(src)
            counter = _Counted(merged_tensors(base=base, tv=tvs, config=cfg))
            self.reload_weights(weights_iterator=iter(counter))
            report = {"path": "streaming", "tensors": counter.n}
        else:
            res = _resident(self, src)
            res.placement = placement
            before = res.captures
            res.capture(cfg)  # reads what this configuration needs and is not held (before the model is touched)
            values = res.values(cfg)
            n_loaded = sum(1 for r in res.regions if not r.module)
            loaded = [(r.tensor, v) for r, v in (next(values) for _ in range(n_loaded))]
            processing = swap(self, values, loaded=loaded)
            report = {"path": "resident", "captured": res.captures != before, "placement": placement,
                      "resident_bytes": res.nbytes, "processing_s": round(processing, 3)}
        io1 = io_counters()
        report.update(seconds=time.perf_counter() - t0,
                      bytes_read=io1.get("rchar", 0) - io0.get("rchar", 0) - io0.get("own", 0),
                      storage_bytes=io1.get("read_bytes", 0) - io0.get("read_bytes", 0))
        if _state.digests is not None:
            _state.digests.after_load()
            report["digest"] = _state.digests.digest()
        return report

    def tvtool_watch_digests(self, source: dict) -> None:
        """From now on, each load reports a digest of what it wrote into every region (see vllm_layout.Digests)."""
        layout = _layout(self, DeltaSource.from_dict(source))
        _state.digests = Digests(self.model_runner.get_model(), layout.regions)

    def tvtool_release(self) -> None:
        """Drop this worker's resident copies (the engine streams from now on)."""
        _state.resident = None

    def tvtool_load_folder(self, path: str) -> int:
        """Load a model folder's weights into this worker; returns the number of tensors."""
        ckpt = Checkpoint.open(path)
        counter = _Counted(ckpt.iter_stored())  # as stored: an fp8 folder's engine takes its fp8 weights and scales
        self.reload_weights(weights_iterator=iter(counter))
        return counter.n


def _layout(worker, src: DeltaSource):
    """This worker's `vllm_layout.Layout` for the tensors `src` merges (baked once per plan)."""
    base, tvs = _open(src)
    plan = output_plan(base, tvs[0])
    key = tuple((p.name, tuple(p.shape), p.dtype) for p in plan)
    if _state.layout is None or _state.layout[0] != key:
        model = worker.model_runner.get_model()
        _state.layout = (key, bake(model, key, next(model.parameters()).device))
    return _state.layout[1]


def _resident(worker, src: DeltaSource):
    """The `Resident` of `src` (a new one, nothing captured yet, when the source changed)."""
    if _state.resident is None or _state.resident.source != src:
        layout = _layout(worker, src)
        base, tvs = _open(src)
        plan = {p.name: p for p in output_plan(base, tvs[0])}
        whole = [Region("", "", n, (), 0, tuple(plan[n].shape), _contiguous(plan[n].shape)) for n in layout.loaded]
        device = next(worker.model_runner.get_model().parameters()).device
        _state.resident = None  # the previous source's copies are freed first
        _state.resident = Resident(source=src, regions=whole + layout.regions, device=device)
    return _state.resident


def _contiguous(shape) -> tuple[int, ...]:
    return tuple(int(s) for s in torch.empty(tuple(shape), device="meta").stride())


def _open(src: DeltaSource):
    """(θ1, [Δ_i]) of `src`, re-opened when an input path was replaced or touched since."""
    key = (src, tuple(_stamp(p) for p in (src.base, src.delta, src.reasoner, *src.more)))
    if key not in _opened:
        _opened.clear()
        _opened[key] = src.open()
    return _opened[key]


def _stamp(path: str | None):
    try:
        st = os.stat(path) if path else None
    except OSError:  # a Hub id
        return None
    return st and (st.st_ino, st.st_mtime_ns, st.st_size)


class _Counted:
    def __init__(self, items: Iterator[tuple[str, torch.Tensor]]):
        self.items, self.n = items, 0

    def __iter__(self):
        for item in self.items:
            self.n += 1
            yield item
