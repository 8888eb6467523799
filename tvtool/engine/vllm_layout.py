"""vLLM's side of the resident α swap, run in the engine's worker processes: where each checkpoint tensor
lands in the engine's parameters, and writing values there the way vLLM's own in-place reload does.

- `bake(model, tensors)`: a dry run of the model's own `load_weights` over zero-storage tensors, with vLLM's
  `FakeRDTTensor`/`BakeSink` (what its sharded weight-transfer backend bakes its replay plan with,
  `sharded_rdt_engine._bake`). Every `copy_` a loader makes is recorded as the source slice (a chain of
  slicing ops) and the destination block of the parameter, after vLLM's sharding and fusing: a `Region`.
  The chain is replayed later on float32 or bfloat16 tensors alike, so nothing passes through the
  parameter's dtype (the loaders' cast) on the way in. A module whose loader computes instead of slicing
  (a `.to()`, arithmetic), or that the recorded copies do not fill, is left to its loaders: `Layout.loaded`.
- `swap(worker, values)`: vLLM's layerwise reload (`reload_weights` in place: meta-restore every layer,
  load, process, copy into the kernel tensors, finalize), with the baked layers written from `values`
  instead of through their loaders, then processed by vLLM as after any load (repacking on CPU,
  quantization...). So the processing sees the bytes the loaders would have written, whatever it does.
- `check_api()`: the vLLM names this relies on, checked when the engine starts (tested with
  `tvtool.engine.options.TESTED_VLLM`).
- `Digests`: sha256 per region of what was written before vLLM's processing (both load paths).
Imports of vLLM are inside the functions: this module is imported only where vLLM runs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from tvtool.engine.resident import Region
from tvtool.io.buffers import reuse

NEEDED = {  # module: names the resident swap uses
    "vllm.model_executor.model_loader.reload.layerwise": (
        "initialize_layerwise_reload", "finalize_layerwise_reload", "get_layerwise_info", "LAYERWISE_INFO",
        "_get_original_loader", "_copy_and_restore_kernel_tensors", "_place_kernel_tensors"),
    "vllm.model_executor.model_loader.reload.meta": ("materialize_layer",),
    "vllm.model_executor.model_loader.reload.utils": ("get_layer_tensors", "get_layer_size"),
    "vllm.model_executor.model_loader.weight_utils": ("default_weight_loader",),
    "vllm.distributed.weight_transfer.sharded_rdt_fake": ("BakeSink", "FakeRDTTensor"),
    "vllm.model_executor.layers.quantization.base_config": ("QuantizeMethodBase",),
    "vllm.config": ("set_current_vllm_config",),
}
WORKER_NEEDED = ("reload_weights", "model_runner.get_model", "model_runner.reset_lora_state",
                 "model_runner.reset_encoder_cache", "model_runner.reset_mm_cache", "vllm_config")


def check_api(worker=None) -> list[str]:
    """The names the swap needs that this vLLM lacks (empty: all there)."""
    missing = []
    for mod, names in NEEDED.items():
        try:
            m = importlib.import_module(mod)
        except ImportError:
            missing.append(mod)
            continue
        missing += [f"{mod}.{n}" for n in names if not hasattr(m, n)]
    for path in WORKER_NEEDED if worker is not None else ():
        obj = worker
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            missing.append(f"worker.{path}")
    return missing


@dataclass
class Layout:
    """Where the checkpoint tensors go in this worker: `regions` (baked modules, in module order), the
    tensors left to vLLM's loaders (`loaded`, with the modules they fill), and tensors the model ignores."""

    regions: list[Region]
    loaded: list[str] = field(default_factory=list)  # checkpoint tensors loaded through their loaders
    loaded_modules: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # the model takes nothing from them (e.g. a tied lm_head)

    def notice(self) -> str | None:
        if not self.loaded_modules:
            return None
        mods = self.loaded_modules
        return (f"resident α swap: {len(mods)} module(s) whose loaders compute rather than slice load through "
                f"vLLM's loaders from unsharded copies: {', '.join(mods[:6])}{', …' if len(mods) > 6 else ''}")


def bake(model: torch.nn.Module, tensors: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
         device: torch.device) -> Layout:
    """Record where the model's loaders put each of `tensors` (name, shape, stored dtype); moves no data."""
    # vLLM is optional: imported where the engine's workers call in, not when tvtool loads
    from vllm.distributed.weight_transfer.sharded_rdt_fake import BakeSink, FakeRDTTensor
    from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload
    from vllm.model_executor.model_loader.reload.utils import get_layer_size

    names = {id(m): n for n, m in model.named_modules()}
    sink = BakeSink()
    failed: dict[str, str | None] = {}  # tensor → the module its loader failed in (None: outside any loader)
    with torch.device(device):
        initialize_layerwise_reload(model)
        last = _stamp(model, sink)
        try:
            fakes = [(n, FakeRDTTensor(n, torch.Size(s), d, device, sink=sink)) for n, s, d in tensors]
            try:
                model.load_weights(iter(fakes))
            except Exception:  # a loader did something no slice describes: find which, one tensor at a time
                sink.copies_by_layer.clear()
                for name, fake in fakes:
                    last.clear()
                    before = {k: len(v) for k, v in sink.copies_by_layer.items()}
                    try:
                        model.load_weights(iter([(name, fake)]))
                    except Exception:  # noqa: BLE001 - any loader error means: not by slices
                        failed[name] = names.get(id(last[0])) if last else None
                        for k, v in sink.copies_by_layer.items():
                            del v[before.get(k, 0):]
        finally:
            _restore(model)
    by_module: dict[str, list[Region]] = {}
    partial = set(failed.values())
    for layer, copies in sink.copies_by_layer.items():
        mod = names[id(layer)]
        if any(c is None for c in copies) or sum(_numel(c.shape) for c in copies) < get_layer_size(layer):
            partial.add(mod)
        dtypes = dict((n, d) for n, _, d in tensors)
        for c in copies:
            name, chain = c.src
            if c.dtype != dtypes[name]:  # a view(dtype) in the chain: not a plain slice
                partial.add(mod)
            by_module.setdefault(mod, []).append(Region(mod, c.param_name, name, tuple(chain), int(c.offset),
                                                        tuple(c.shape), tuple(c.stride)))
    if None in partial:  # a failure outside any loader: where its tensor goes is unknown
        raise RuntimeError(f"the model's load_weights failed on {[t for t, m in failed.items() if m is None][:3]}")
    loaded = {t for t in failed}
    while True:  # a tensor feeding a module left to its loaders goes through the loaders, and so do its modules
        loaded |= {r.tensor for m in partial for r in by_module.get(m, ())}
        more = {m for m, rs in by_module.items() if m not in partial and any(r.tensor in loaded for r in rs)}
        if not more:
            break
        partial |= more
    regions = [r for m, rs in by_module.items() if m not in partial for r in rs]
    used = {r.tensor for r in regions} | loaded
    return Layout(regions, sorted(loaded), sorted(partial), sorted(n for n, _, _ in tensors if n not in used))


def swap(worker, values: Iterable[tuple[Region, torch.Tensor]], *,
         loaded: Iterable[tuple[str, torch.Tensor]] = ()) -> float:
    """Put `values` (per region, in module order) and `loaded` (whole tensors, through the loaders) into the
    engine, as `reload_weights` would have put the same checkpoint tensors (see the module doc). Returns the
    seconds vLLM's post-load processing took (repacking on CPU).

    Each region's value is written as it comes (a layer is materialized at its first region and processed
    after its last), so the values' buffers are recycled (`tvtool.io.buffers.reuse`) instead of page-faulting
    fresh memory for every region."""
    # vLLM is optional: imported where the engine's workers call in, not when tvtool loads
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.layerwise import (finalize_layerwise_reload,
                                                                  initialize_layerwise_reload)

    runner = worker.model_runner
    model = runner.get_model()
    modules = dict(model.named_modules())
    processing = 0.0
    with set_current_vllm_config(worker.vllm_config), reuse():
        initialize_layerwise_reload(model)
        try:
            batch = list(loaded)
            if batch:
                model.load_weights(iter(batch))
            layer = name = None
            for region, value in values:
                if region.module != name:
                    if layer is not None:
                        processing += _process_layer(layer)
                    name, layer = region.module, modules[region.module]
                    _open_layer(layer)
                region.target(getattr(layer, region.param)).copy_(value)  # the loaders' copy_ (and its cast)
                del value
            if layer is not None:
                processing += _process_layer(layer)
        finally:
            finalize_layerwise_reload(model, runner.model_config)
    runner.reset_lora_state()  # what the worker's reload_weights does after loading
    runner.reset_encoder_cache()
    runner.reset_mm_cache()
    return processing


def _open_layer(layer: torch.nn.Module) -> None:
    """vLLM's `_layerwise_process` up to its loaders: the layer materialized, its loaders unwrapped."""
    # vLLM is optional: imported where the engine's workers call in, not when tvtool loads
    from vllm.model_executor.model_loader.reload.layerwise import _get_original_loader, get_layerwise_info
    from vllm.model_executor.model_loader.reload.meta import materialize_layer
    from vllm.model_executor.model_loader.reload.utils import get_layer_tensors

    materialize_layer(layer, get_layerwise_info(layer))
    if hasattr(layer, "_already_called_process_weights_after_loading"):
        delattr(layer, "_already_called_process_weights_after_loading")
    for t in get_layer_tensors(layer).values():
        t.weight_loader = _get_original_loader(t)


def _process_layer(layer: torch.nn.Module) -> float:
    """The rest of vLLM's `_layerwise_process`: its processing, then the kernel tensors; returns the seconds."""
    # vLLM is optional: imported where the engine's workers call in, not when tvtool loads
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
    from vllm.model_executor.model_loader.reload.layerwise import _copy_and_restore_kernel_tensors, get_layerwise_info

    t0 = time.perf_counter()
    info = get_layerwise_info(layer)
    qm = getattr(layer, "quant_method", None)
    if isinstance(qm, QuantizeMethodBase):
        qm.process_weights_after_loading(layer)  # (a Digests hook records the regions first)
        if hasattr(layer, "update_param_tp_status"):
            layer.update_param_tp_status()
    if info.kernel_tensors is not None:
        _copy_and_restore_kernel_tensors(layer, info)
    info.reset()
    return time.perf_counter() - t0


# --- the dry run's loader stamps (as vLLM's sharded_rdt_engine._install_recording_stamps) -------------


def _stamp(model: torch.nn.Module, sink) -> list:
    """Wrap each loadable tensor's ORIGINAL loader so the sink can attribute each copy to (layer, param);
    returns a list holding the layer whose loader ran last (for naming a failure)."""
    # vLLM is optional: imported where the engine's workers call in, not when tvtool loads
    from vllm.model_executor.model_loader.reload.layerwise import _get_original_loader
    from vllm.model_executor.model_loader.reload.utils import get_layer_tensors
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    last: list = []

    def make(layer, name, inner, added):
        @functools.wraps(inner)
        def stamp(*args, **kwargs):
            sink.current = (layer, name)
            last[:] = [layer]
            try:
                return inner(*args, **kwargs)
            finally:
                sink.current = None

        stamp._tvtool_inner, stamp._tvtool_added = inner, added
        return stamp

    for module in model.modules():
        for name, tensor in get_layer_tensors(module).items():
            if getattr(tensor, "weight_loader", None) is None:
                tensor.weight_loader = make(module, name, default_weight_loader, True)
            else:
                tensor.weight_loader = make(module, name, _get_original_loader(tensor), False)
    return last


def _restore(model: torch.nn.Module) -> None:
    """Undo the dry run: kernel tensors back in place, layerwise state reset, stamps removed."""
    # vLLM is optional: imported where the engine's workers call in, not when tvtool loads
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO, _place_kernel_tensors
    from vllm.model_executor.model_loader.reload.utils import get_layer_tensors

    for layer in model.modules():
        info = LAYERWISE_INFO.get(layer)
        if info is not None and info.can_load():
            if info.kernel_tensors is not None:
                _place_kernel_tensors(layer, info)
            info.reset()
    for module in model.modules():
        for tensor in get_layer_tensors(module).values():
            loader, added = getattr(tensor, "weight_loader", None), False
            while loader is not None and hasattr(loader, "_tvtool_inner"):
                added = added or loader._tvtool_added
                loader = loader._tvtool_inner
                tensor.weight_loader = loader
            if added:
                del tensor.weight_loader
    if hasattr(model, "_original_do_torchao_reload"):
        model._do_torchao_reload = model._original_do_torchao_reload


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# --- digests of what each load wrote ---------------------------------------------------------------------


class Digests:
    """sha256 per region of the values written before vLLM's processing, for any load path.

    Layers with a quant method are hashed when vLLM calls its `process_weights_after_loading` (their
    kernel tensors may be repacked after, e.g. oneDNN on CPU): a hook installed once per quant method
    records into the worker's current `Digests`; the others after the load, from their parameters.
    `digest()` combines them in region order: equal digests, equal bytes in every region."""

    current: "Digests | None" = None

    def __init__(self, model: torch.nn.Module, regions: Sequence[Region]):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.modules = dict(model.named_modules())
        self.regions: dict[str, list[tuple[int, Region]]] = {}
        for i, r in enumerate(regions):
            self.regions.setdefault(r.module, []).append((i, r))
        self.hashes: dict[int, str] = {}
        for name in self.regions:
            qm = getattr(self.modules[name], "quant_method", None)
            if qm is not None and not hasattr(qm, "_tvtool_process"):
                qm._tvtool_process = qm.process_weights_after_loading
                qm.process_weights_after_loading = functools.partial(_hooked, qm._tvtool_process)
        Digests.current = self

    def record(self, layer: torch.nn.Module) -> None:
        for i, r in self.regions.get(self.names.get(id(layer)), ()):
            v = r.target(getattr(layer, r.param)).detach().to("cpu").contiguous()
            self.hashes[i] = hashlib.sha256(v.view(torch.uint8).numpy().tobytes()).hexdigest()

    def after_load(self) -> None:
        # vLLM is optional: imported where the engine's workers call in, not when tvtool loads
        from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

        for name in self.regions:
            layer = self.modules[name]
            if not isinstance(getattr(layer, "quant_method", None), QuantizeMethodBase):  # not processed: as loaded
                self.record(layer)

    def digest(self) -> str:
        """The load's digest; every region must have been hashed (else the comparison would be weaker)."""
        missing = [r for items in self.regions.values() for i, r in items if i not in self.hashes]
        if missing:
            raise RuntimeError(f"{len(missing)} region(s) not hashed, e.g. {missing[0].module}.{missing[0].param}")
        h = hashlib.sha256()
        for name, items in self.regions.items():
            for i, r in items:
                h.update(f"{name}.{r.param}[{r.offset}]{r.shape}:{self.hashes[i]}".encode())
        self.hashes.clear()
        return h.hexdigest()


def _hooked(real, layer, *args, **kwargs):
    if Digests.current is not None:
        Digests.current.record(layer)
    return real(layer, *args, **kwargs)


def io_counters() -> dict[str, int]:
    """This process's I/O counters (/proc/self/io): rchar = bytes through read calls (page cache included),
    read_bytes = bytes fetched from storage. Reading the file counts in the next reading's rchar: `own` is
    its size, to take off a difference."""
    out = {}
    try:
        with open("/proc/self/io", "rb") as f:
            data = f.read()
    except OSError:
        return out
    for line in data.splitlines():
        k, _, v = line.partition(b":")
        out[k.strip().decode()] = int(v)
    out["own"] = len(data)
    return out
