"""Streaming safetensors I/O: read a header, read row ranges, write a file tensor by tensor.

safetensors' own `save_file` needs every tensor of a file in memory at once, so the
writer is ours. The reader is ours for a measured reason (bench/bench_reader.py,
BENCHMARKS.md): reading a 2.5 GB-per-checkpoint Llama-8B-shaped pair in row chunks,
`safe_open(...).get_slice(name)[a:b]` peaked at 7× the RSS of `read_rows` (2.9 GB vs
0.4 GB: every page read stays mapped until the file is closed, so RSS grows to the
largest shard per open input) at no measurable difference in time. The header
checks below reject a damaged file with one line naming the file and tensor.
Format: u64 little-endian header length N, N bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}},
then the raw little-endian data of every tensor, row-major.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from tvtool.io.buffers import empty
from tvtool.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "C64": torch.complex64,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}  # safetensors.torch's table (0.8), so every file it can load, we can read
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: ({name: TensorInfo}, metadata)."""
    size = _file_size(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError("file is too short to be safetensors", where=str(path),
                                  fix="re-download or re-create it")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError("corrupt safetensors header (bad length)", where=str(path),
                                  fix="the file is truncated or not safetensors; re-download it")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError("corrupt safetensors header (not JSON)", where=str(path),
                                  fix="the file is damaged; re-download it") from None
        except _Duplicate as e:
            raise CheckpointError(f"corrupt safetensors header (key {e.args[0]!r} appears twice)", where=str(path),
                                  fix="the file is damaged; re-download it") from None
    return validate_header(header, path=Path(path), start=8 + n, size=size)


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def validate_header(header, *, path: Path, start: int, size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Check a parsed header as strictly as the safetensors library does; one CheckpointError per fault.

    A JSON object; `__metadata__` a {str: str} map; per tensor a known dtype, a shape of
    non-negative ints and [begin, end] offsets whose length is shape × itemsize; the data
    ranges, sorted, tile the data section exactly (no overlap, no gap, nothing after the
    last tensor, nothing past the end of the file). `start` is where the data section begins.
    """
    where, damaged = str(path), "the file is damaged or was not written as safetensors; re-download or re-create it"
    if not isinstance(header, dict):
        raise CheckpointError(f"corrupt safetensors header (a JSON {type(header).__name__}, not an object)",
                              where=where, fix=damaged)
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError("corrupt safetensors header (__metadata__ must map strings to strings)",
                              where=where, fix=damaged)
    infos: dict[str, TensorInfo] = {}
    for name, h in header.items():
        entry = f"corrupt safetensors header entry for tensor {name!r}"
        if not isinstance(h, dict) or not {"dtype", "shape", "data_offsets"} <= h.keys():
            raise CheckpointError(f"{entry} (needs dtype, shape and data_offsets)", where=where, fix=damaged)
        if h["dtype"] not in DTYPES:
            raise CheckpointError(f"{entry} (unsupported dtype {h['dtype']!r})", where=where,
                                  fix=f"the file is damaged or uses a dtype tvtool does not read ({', '.join(DTYPES)})")
        shape, offsets = h["shape"], h["data_offsets"]
        if not isinstance(shape, list) or not all(type(d) is int for d in shape):
            raise CheckpointError(f"{entry} (shape {shape!r} is not a list of integers)", where=where, fix=damaged)
        if any(d < 0 for d in shape):
            raise CheckpointError(f"tensor {name!r} has a negative dimension in its shape {shape}",
                                  where=where, fix=damaged)
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(x) is int for x in offsets)
                or offsets[0] < 0 or offsets[1] < offsets[0]):
            raise CheckpointError(f"{entry} (data_offsets {offsets!r} is not [begin, end] with 0 ≤ begin ≤ end)",
                                  where=where, fix=damaged)
        dtype, (b, e) = DTYPES[h["dtype"]], offsets
        if e - b != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"tensor {name!r} has a byte range that does not match its shape "
                                  f"({e - b} bytes for {h['dtype']} {shape})", where=where,
                                  fix="the file is damaged; re-download it")
        if start + e > size:
            raise CheckpointError(f"truncated safetensors file: tensor {name!r} ends past the end of the file "
                                  f"({start + e} > {size} bytes)", where=where,
                                  fix="the download or copy was cut short; re-download it")
        infos[name] = TensorInfo(path, dtype, tuple(shape), start + b, start + e)
    pos, prev = start, None
    for name, info in sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != pos:
            what = (f"overlaps tensor {prev!r}" if info.begin < pos else
                    f"starts {info.begin - pos} bytes after the end of the previous tensor")
            raise CheckpointError(f"corrupt safetensors header: the data of tensor {name!r} {what}",
                                  where=where, fix="the file is damaged (safetensors refuses it); re-create it")
        pos, prev = info.end, name
    if pos != size:
        raise CheckpointError(f"corrupt safetensors file: {size - pos} bytes after the last tensor's data",
                              where=where, fix="the file is damaged (safetensors refuses it); re-create it")
    return infos, meta


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        raise CheckpointError("file not found", where=str(path), fix="check the path") from None


def read_rows(info: TensorInfo, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of the tensor (the whole tensor for 0-d/1-d), read from disk into RAM."""
    if len(info.shape) == 0:
        start, stop, row_shape = 0, 1, ()
    else:
        stop = info.shape[0] if stop is None else stop
        row_shape = info.shape[1:]
    row_bytes = math.prod(row_shape) * info.dtype.itemsize
    out = empty((stop - start, *row_shape), info.dtype)  # reused within a pass (tvtool.io.buffers)
    buf = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.begin + start * row_bytes)
        got = f.readinto(buf) if out.numel() else 0
    if got != (stop - start) * row_bytes:
        raise CheckpointError("truncated safetensors file (short read)", where=str(info.file),
                              fix="re-download it")
    return out.reshape(info.shape) if len(info.shape) == 0 else out


ROW_CHUNK = 1 << 23  # elements per row chunk: the unit every streaming pass reads, merges and writes


def row_chunks(shape: tuple[int, ...], max_elems: int = ROW_CHUNK) -> list[tuple[int, int]]:
    """Split the first axis into [start, stop) ranges of at most ~max_elems elements each."""
    if len(shape) <= 1:
        return [(0, shape[0] if shape else 1)]
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, max_elems // per_row)
    return [(s, min(s + step, shape[0])) for s in range(0, shape[0], step)]


class StreamWriter:
    """Write one safetensors file whose layout is known up front, tensor data in order.

    `plan` is [(name, dtype, shape)] in file order. Call `write(name, chunk)` with
    consecutive row chunks of each tensor, in plan order, then `close()`. The file is
    `path` + ".partial" until `close()` succeeds (it is then renamed into place).
    """

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, *, atomic: bool = True):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial") if atomic else self.path
        header: dict = {"__metadata__": dict(metadata or {})} if metadata else {}
        offset = 0
        self._expect: list[tuple[str, int]] = []
        for name, dtype, shape in plan:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._expect.append((name, nbytes))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.total = 8 + len(blob) + offset
        self._f = open(self.tmp, "wb")
        self._f.write(struct.pack("<Q", len(blob)) + blob)
        self._i, self._left = 0, (self._expect[0][1] if self._expect else 0)

    def write(self, name: str, chunk: torch.Tensor) -> int:
        """Append a chunk of tensor `name`; returns the bytes written.

        Tensors with no bytes (a (0, 128) shape) get no chunks: they are skipped over here."""
        while self._left == 0 and name != self._expect[self._i][0] and self._i + 1 < len(self._expect):
            self._i += 1
            self._left = self._expect[self._i][1]
        want = self._expect[self._i][0]
        if name != want:
            raise RuntimeError(f"StreamWriter: got {name!r}, expected {want!r}")
        data = chunk.contiguous().view(-1).view(torch.uint8).numpy() if chunk.numel() else b""
        n = len(data)
        if n > self._left:
            raise RuntimeError(f"StreamWriter: too many bytes for {name!r}")
        self._f.write(data)
        self._left -= n
        return n

    def close(self) -> None:
        """Flush, fsync and rename into place; fails if any tensor is incomplete."""
        while self._left == 0 and self._i + 1 < len(self._expect) and self._expect[self._i + 1][1] == 0:
            self._i += 1  # trailing tensors with no bytes
        done = not self._expect or (self._i == len(self._expect) - 1 and self._left == 0)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if not done:
            raise RuntimeError(f"StreamWriter: {self.path.name} closed before all tensors were written")
        if self.tmp != self.path:
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Close and delete the partial file."""
        if not self._f.closed:
            self._f.close()
        self.tmp.unlink(missing_ok=True)
