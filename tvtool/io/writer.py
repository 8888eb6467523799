"""Writing outputs: sharded safetensors folders, atomic folders, sizes and progress bars."""

from __future__ import annotations

import base64
import json
import math
import queue
import re
import threading
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from tqdm.auto import tqdm

from tvtool.io.atomic import atomic_dir, atomic_write
from tvtool.errors import OptionsError, OutputError
from tvtool.io.layout import INDEX
from tvtool.io.safetensors_io import StreamWriter

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' → 5_000_000_000, '500MiB' → 524_288_000, 1000 → 1000."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not m or float(m.group(1)) <= 0:
        raise OptionsError(f"bad size {text!r}", where="--max-shard-size", fix="use e.g. 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def progress(total: int, desc: str, enabled: bool = True):
    """A bytes progress bar (tqdm, on stderr), silent when disabled."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000,
                disable=not enabled, dynamic_ncols=True, leave=False)


Plan = list[tuple[str, torch.dtype, tuple[int, ...]]]


def plan_bytes(plan: Plan) -> int:
    return sum(math.prod(s) * d.itemsize for _, d, s in plan)


class ShardedWriter:
    """Writes `plan` as HF-style shards (+ index) into `folder`, or as one `single_file`.

    Tensors arrive as consecutive row chunks in plan order (`write(name, chunk)`). The
    grouping into shards and the file names are huggingface_hub's
    (`split_state_dict_into_shards_factory`, fed names and byte sizes only, so nothing is
    loaded): a tensor larger than `max_shard_size` gets a shard of its own while the
    current shard stays open, so at most two shard files are open at once. Every shard
    header carries `metadata`.
    """

    def __init__(self, *, folder: Path | None, plan: Plan, metadata: dict[str, str], max_shard_size: int,
                 single_file: Path | None = None, atomic_file: bool = False):
        entries = {e[0]: e for e in plan}
        if single_file is not None:
            self.files, groups = [Path(single_file)], [list(plan)]
        else:
            split = split_state_dict_into_shards_factory(
                entries, get_storage_size=lambda e: math.prod(e[2]) * e[1].itemsize,
                filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
            self.files = [folder / f for f in split.filename_to_tensors]
            groups = [[entries[n] for n in names] for names in split.filename_to_tensors.values()]
        self.groups, self.metadata, self.folder, self.atomic = groups, metadata, folder, atomic_file
        self._shard_of = {e[0]: i for i, g in enumerate(groups) for e in g}
        self._last = {g[-1][0]: i for i, g in enumerate(groups) if g}  # the tensor that completes each shard
        self._open: dict[int, StreamWriter] = {}
        self._current: str | None = None
        self._opened: set[int] = set()
        self._closed = False
        self.total_size = plan_bytes(plan)

    def write(self, name: str, chunk: torch.Tensor) -> int:
        if self._current is not None and name != self._current:
            self._finish(self._current)
        self._current = name
        i = self._shard_of[name]
        if i not in self._open:
            self._open[i] = StreamWriter(self.files[i], self.groups[i], self.metadata, atomic=self.atomic)
            self._opened.add(i)
        return self._open[i].write(name, chunk)

    def _finish(self, name: str) -> None:
        """Close the shard that `name` completes (its last tensor has had all its chunks)."""
        i = self._last.get(name)
        if i is not None and i in self._open:
            self._open.pop(i).close()

    def close(self) -> list[Path]:
        """Close the last shard and write the index (when sharded); returns the files written. Idempotent."""
        if self._closed:
            return self.files
        self._closed = True
        if self._current is not None:
            self._finish(self._current)
            self._current = None
        for i, w in sorted(self._open.items()):  # incomplete shards: StreamWriter.close raises
            self._open.pop(i)
            w.close()
        for i, f in enumerate(self.files):  # never opened: only a shard with no bytes to write may be made here
            if i not in self._opened:
                if plan_bytes(self.groups[i]):
                    raise RuntimeError(f"ShardedWriter: shard {f.name} was never written")
                StreamWriter(f, self.groups[i], self.metadata, atomic=self.atomic).close()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size, **self.metadata},
                     "weight_map": {e[0]: self.files[i].name for i, g in enumerate(self.groups) for e in g}}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return self.files

    def abort(self) -> None:
        for w in self._open.values():
            w.abort()
        self._open.clear()

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close (shards + index) on success; on an error, close the open shard and leave the rest to
        the enclosing `atomic_dir`/`atomic_write`, which removes the partial output."""
        if exc_type is None:
            self.close()
        else:
            self.abort()


def check_free(final: Path, *, overwrite: bool, what: str) -> None:
    if final.exists() and not overwrite:
        raise OutputError(f"{what} already exists", where=str(final), fix="pass --overwrite or choose another path")


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(items, depth: int = 2):
    """Iterate `items` in a background thread, up to `depth` ahead, so reads overlap compute.

    File reads release the GIL, so reading the next chunk proceeds while torch works on this one.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def run():
        try:
            for x in items:
                while not stop.is_set():
                    try:
                        q.put(x, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(_Failure(e))

    t = threading.Thread(target=run, daemon=True, name="tvtool-prefetch")
    t.start()
    try:
        while (x := q.get()) is not done:
            if isinstance(x, _Failure):
                raise x.error
            yield x
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


class WriteBehind:
    """Performs `writer.write(name, chunk)` calls in background threads, so writes overlap compute.

    Each writer is bound to one of `lanes` threads (round robin on first use), and a writer's writes
    stay in submission order. One lane per output lets the page-cache copies of several outputs run
    on several cores: with one thread, writing 5 outputs was a serial memcpy that set materialize's
    pace (BENCHMARKS.md). `depth` chunks may wait per lane.
    """

    def __init__(self, depth: int = 2, on_bytes=None, lanes: int = 1):
        self._qs: list[queue.Queue] = [queue.Queue(maxsize=depth) for _ in range(max(1, lanes))]
        self._lane: dict[int, int] = {}
        self._error: BaseException | None = None
        self._on_bytes = on_bytes
        self._lock = threading.Lock()
        self._ts = [threading.Thread(target=self._run, args=(q,), daemon=True, name=f"tvtool-write-{k}")
                    for k, q in enumerate(self._qs)]
        for t in self._ts:
            t.start()

    def _run(self, q: queue.Queue):
        while (item := q.get()) is not None:
            try:
                if self._error is None:
                    n = item[0].write(item[1], item[2])
                    if self._on_bytes:
                        with self._lock:
                            self._on_bytes(n)
            except BaseException as e:
                self._error = e
            finally:
                q.task_done()
        q.task_done()

    def submit(self, writer, name: str, chunk: torch.Tensor) -> None:
        self._check()
        lane = self._lane.setdefault(id(writer), len(self._lane) % len(self._qs))
        self._qs[lane].put((writer, name, chunk))

    def flush(self) -> None:
        """Wait until every submitted write is done; raise the first write error."""
        for q in self._qs:
            q.join()
        self._check()

    def close(self) -> None:
        for q in self._qs:
            q.put(None)
        for t in self._ts:
            t.join()

    def _check(self):
        if self._error is not None:
            raise self._error


def write_tensors(*, out: Path, plan: Plan, metadata: dict[str, str], files: dict[str, bytes],
                  max_shard_size: int, fill) -> list[Path]:
    """Write a delta-like output atomically and return its files.

    `out` ending in .safetensors is one file carrying `files` (config, tokenizer…) base64-encoded in
    its metadata; otherwise a sharded folder with `files` alongside. `fill(writer)` must write every
    tensor of `plan`, in order, through `writer.write(name, chunk)`.
    """
    single = out.suffix == ".safetensors"
    meta = dict(metadata)
    if single:
        meta["tvtool.files"] = json.dumps({k: base64.b64encode(v).decode() for k, v in files.items()})
    with (atomic_write(out) if single else atomic_dir(out)) as tmp:
        with ShardedWriter(folder=None if single else tmp, plan=plan, metadata=meta, max_shard_size=max_shard_size,
                           single_file=tmp if single else None) as writer:
            fill(writer)
        if not single:
            for fname, data in files.items():
                (tmp / fname).write_bytes(data)
    return [out] if single else [out / f.name for f in writer.files]
