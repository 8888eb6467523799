"""Content fingerprints of inputs: what identifies a checkpoint's content cheaply (no tensor data read).

Finished-work records (`tvtool.io.finished`) hold these, never paths, so a moved input keeps its fingerprint.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from tvtool.io.checkpoint import Checkpoint, resolve
from tvtool.io.layout import ADAPTER_CONFIG, INDEX

_BLOCKS, _BLOCK = 16, 1 << 16  # data blocks sampled per safetensors file: 16 × 64 KiB, evenly spaced
_PICKLE_SAMPLE = 1 << 20  # bytes hashed at each end of a pickle (*.bin) file



def input_fingerprint(ref: str | os.PathLike, *, allow_pickle: bool = False) -> dict:
    """What identifies a checkpoint's content, cheaply (no tensor data is read).

    A Hub id: its repo id and resolved commit. A local checkpoint: per weight file its name,
    size and the sha256 of its safetensors header (names, dtypes, shapes, offsets, metadata);
    for a pickle (*.bin) file, of its first and last MiB. Plus the sha256 of 16 evenly spaced
    64 KiB blocks of the data (1 MiB per file), so weights edited in place under an unchanged
    header (any fine-tune changes most bytes) change it too. Plus the sha256 of the index and of
    every config/tokenizer file (and a PEFT adapter's adapter_config.json), which change the merged
    model too.
    """
    src = resolve(ref, allow_pickle=allow_pickle)
    if src.repo_id is not None:
        return {"repo_id": src.repo_id, "commit": src.revision}
    ckpt = Checkpoint.open(src, allow_pickle=allow_pickle)
    root = ckpt.folder
    files = [{"file": _rel(f, root), "size": f.stat().st_size, "sha256": _head_hash(f), "sample": _data_sample(f)}
             for f in ckpt.files()]
    side = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(ckpt.side_files().items())}
    for name in (INDEX, ADAPTER_CONFIG):  # a PEFT adapter's config sets its scale s = lora_alpha / r
        if src.path.is_dir() and (src.path / name).is_file():
            side[name] = hashlib.sha256((src.path / name).read_bytes()).hexdigest()
    return {"files": files, "side_files": side}



def _head_hash(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        if f.suffix == ".safetensors":
            head = fh.read(8)
            h.update(head)
            if len(head) == 8:
                h.update(fh.read(struct.unpack("<Q", head)[0]))
        else:
            h.update(fh.read(_PICKLE_SAMPLE))
            size = f.stat().st_size
            if size > 2 * _PICKLE_SAMPLE:
                fh.seek(size - _PICKLE_SAMPLE)
                h.update(fh.read())
    return h.hexdigest()



def _data_sample(f: Path) -> str:
    """sha256 of `_BLOCKS` evenly spaced `_BLOCK`-byte blocks of the file (all of it when small)."""
    h, size = hashlib.sha256(), f.stat().st_size
    with open(f, "rb") as fh:
        if size <= _BLOCKS * _BLOCK:
            h.update(fh.read())
        else:
            for i in range(_BLOCKS):
                fh.seek((size - _BLOCK) * i // (_BLOCKS - 1))
                h.update(fh.read(_BLOCK))
    return h.hexdigest()



def _rel(f: Path, root: Path) -> str:
    try:
        return f.relative_to(root).as_posix()
    except ValueError:
        return f.name
