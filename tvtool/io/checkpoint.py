"""Checkpoints as lazy maps from tensor name to bytes on disk.

A checkpoint is a Hugging Face model folder (`model.safetensors`, or shards plus
`model.safetensors.index.json`, plus config/tokenizer files), a single
`.safetensors` file, or a Hub id `org/name[@revision]` resolved through the local
cache. Tensors are matched by name, never by file, and read in row chunks.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fnmatch
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                    RevisionNotFoundError)

from tvtool.errors import CheckpointError
from tvtool.io.fp8 import FP8, BlockScaled, dequantized_view, refused_error, unquantized_config
from tvtool.io.layout import INDEX, parse_hub_ref
from tvtool.io.safetensors_io import TensorInfo, read_header, read_rows

# Everything but the weights that a model folder needs to load and chat.
SIDE_PATTERNS = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                 "added_tokens.json", "vocab.*", "merges.txt", "chat_template*", "*.tiktoken")
_CACHE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)
_LOCAL_ONLY = contextvars.ContextVar("tvtool_local_only", default=False)


@contextlib.contextmanager
def local_only():
    """Within this block a Hub id resolves from the local Hugging Face cache only: nothing is downloaded
    (what `sweep --plan` needs: it reads headers and config.json files, never fetches weights)."""
    token = _LOCAL_ONLY.set(True)
    try:
        yield
    finally:
        _LOCAL_ONLY.reset(token)


def is_local_only() -> bool:
    return _LOCAL_ONLY.get()


@dataclass(frozen=True)
class Source:
    """Where a checkpoint came from: the local path, what the user typed, and Hub coordinates."""

    path: Path
    ref: str
    repo_id: str | None = None
    revision: str | None = None

    def describe(self) -> dict:
        return {"source": self.ref, "repo_id": self.repo_id, "revision": self.revision}


def resolve(ref: str | os.PathLike, *, allow_pickle: bool = False) -> Source:
    """A local path as is; a Hub id through huggingface_hub (cache first, honours HF_HUB_OFFLINE)."""
    ref = str(ref)
    if os.path.exists(ref):
        return Source(Path(ref), ref)
    hub = parse_hub_ref(ref)
    if hub is None:
        raise CheckpointError("checkpoint not found", where=ref,
                              fix="give a model folder, a .safetensors file or a Hub id like org/name[@revision]")
    repo_id, revision = hub
    patterns = ["*.safetensors", "*.json", *SIDE_PATTERNS] + (["*.bin"] if allow_pickle else [])
    try:
        path = snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns,
                                 local_files_only=is_local_only())
    except RevisionNotFoundError:
        raise CheckpointError(f"revision {revision!r} not found on the Hub", where=repo_id,
                              fix="check the branch, tag or commit after '@'") from None
    except RepositoryNotFoundError:
        raise CheckpointError("Hub repository not found or not accessible", where=repo_id,
                              fix="check the id, or log in (huggingface-cli login / HF_TOKEN) for a private repo") from None
    except LocalEntryNotFoundError:
        if is_local_only():
            raise CheckpointError("not in the local Hugging Face cache (nothing is downloaded here)", where=ref,
                                  fix=f"download it (or only its config.json: huggingface-cli download {repo_id} "
                                      "config.json), or pass a local folder") from None
        raise CheckpointError("not in the local Hugging Face cache and the Hub cannot be reached", where=ref,
                              fix="download it on a machine with a network (or unset HF_HUB_OFFLINE), "
                                  "or pass a local folder") from None
    except OSError as e:
        if isinstance(e, (PermissionError, FileExistsError)) or e.errno in _CACHE_ERRNOS:
            from huggingface_hub import constants

            raise CheckpointError(f"cannot write to the Hugging Face cache: {e.strerror or type(e).__name__}",
                                  where=str(e.filename or constants.HF_HUB_CACHE),
                                  fix="make the cache writable, or set HF_HOME (or HF_HUB_CACHE) to a writable "
                                      "folder") from None
        raise CheckpointError(f"could not download from the Hub: {type(e).__name__}", where=ref,
                              fix="check the network, or pass a local folder") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"could not download from the Hub: {type(e).__name__}", where=ref,
                              fix="check the network, or pass a local folder") from None
    return Source(Path(path), ref, repo_id, Path(path).name)


def _weight_map(index_path: Path) -> dict[str, str]:
    """The index's {tensor: shard file} map, validated: a JSON object whose weight_map maps strings to strings."""
    fix = "the index is damaged; re-download or re-create it"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError("malformed index (not JSON)", where=str(index_path), fix=fix) from None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if wm is None:
        raise CheckpointError("malformed index (no weight_map)", where=str(index_path),
                              fix="re-download or re-create the index")
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise CheckpointError(f"malformed index (weight_map is a JSON {type(wm).__name__}, not a map from tensor "
                              "names to shard file names)", where=str(index_path), fix=fix)
    return wm


def _trusted_root(root: Path) -> Path:
    """Where a shard may live: the folder itself, or for a Hugging Face cache snapshot
    (`models--org--name/snapshots/<sha>`, shards symlinked to `../../blobs/<hash>`) the repo folder."""
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        return root.parent.parent
    return root


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class Checkpoint:
    """Tensor names → lazily read tensors, over one or many files. Use `Checkpoint.open(ref)`."""

    def __init__(self, source: Source, infos: dict[str, TensorInfo], metadata: dict[str, str],
                 pickled: dict[str, Path] | None = None):
        self.source, self.metadata = source, metadata
        self._pickled = pickled or {}
        self._pickle_cache: tuple[Path, dict] | None = None
        # float8 weights with block scales read as float32 weights; other fp8 tensors are refused (tvtool.io.fp8)
        self._scaled: dict[str, BlockScaled] = {}
        self._refused: dict[str, str] = {}
        self._stored = infos  # as on disk: what an engine started from this folder loads (`iter_stored`)
        if any(i.dtype in FP8 for i in infos.values()):
            infos, self._scaled, self._refused = dequantized_view(infos, self._stored_config(), pickled=bool(pickled))
        self._infos = infos

    # -- opening -----------------------------------------------------------------
    @classmethod
    def open(cls, ref: str | os.PathLike | Source, *, allow_pickle: bool = False) -> "Checkpoint":
        src = ref if isinstance(ref, Source) else resolve(ref, allow_pickle=allow_pickle)
        p = src.path
        if p.is_file():
            infos, meta = read_header(p)
            return cls(src, infos, meta)
        if (p / INDEX).is_file():
            return cls._open_index(src)
        files = sorted(p.glob("*.safetensors"))
        if files:
            infos, meta = {}, {}
            for f in files:
                i, m = read_header(f)
                dup = i.keys() & infos.keys()
                if dup:
                    raise CheckpointError(f"tensor {sorted(dup)[0]!r} appears in two files and there is no index",
                                          where=str(f), fix=f"add a {INDEX} or remove the stray file")
                infos.update(i)
                meta = meta or m
            return cls(src, infos, meta)
        bins = sorted(p.glob("*.bin"))
        if bins:
            if not allow_pickle:
                raise CheckpointError("pickle checkpoint (*.bin) refused: loading pickle can run arbitrary code",
                                      where=str(p), fix="convert it to safetensors, or pass --allow-pickle "
                                                        "to load it with torch.load(weights_only=True)")
            return cls._open_pickle(src, bins)
        raise CheckpointError("no weights found (no *.safetensors file)", where=str(p),
                              fix="point at a model folder with model.safetensors or an index")

    @classmethod
    def _open_index(cls, src: Source) -> "Checkpoint":
        index_path = src.path / INDEX
        weight_map = _weight_map(index_path)
        root = src.path.resolve()
        trusted = _trusted_root(root)
        headers: dict[str, tuple[dict, dict]] = {}
        infos: dict[str, TensorInfo] = {}
        meta: dict[str, str] = {}
        for name, fname in weight_map.items():
            if (os.path.isabs(fname) or os.path.dirname(os.path.normpath(fname))
                    or not _within((root / fname).resolve(), trusted)):
                raise CheckpointError(f"index names a file outside the checkpoint folder: {fname!r}",
                                      where=str(index_path), fix="the index is unsafe or damaged; re-create it")
            if fname not in headers:
                if not (root / fname).is_file():
                    raise CheckpointError(f"index names a missing shard file {fname!r}", where=str(index_path),
                                          fix="the download is incomplete; fetch the missing shard")
                headers[fname] = read_header(root / fname)
                meta = meta or headers[fname][1]
            shard = headers[fname][0]
            if name not in shard:
                raise CheckpointError(f"index maps tensor {name!r} to {fname!r}, which does not contain it",
                                      where=str(index_path), fix="the index and shards disagree; re-download")
            infos[name] = shard[name]
        return cls(src, infos, meta)

    @classmethod
    def _open_pickle(cls, src: Source, bins: list[Path]) -> "Checkpoint":
        infos, pickled = {}, {}
        for f in bins:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for bad pickles
                raise CheckpointError(f"cannot load pickle checkpoint safely: {type(e).__name__}", where=str(f),
                                      fix="convert it to safetensors with the tool that made it") from None
            for name, t in sd.items():
                if isinstance(t, torch.Tensor):
                    infos[name] = TensorInfo(f, t.dtype, tuple(t.shape), -1, t.numel() * t.element_size() - 1)
                    pickled[name] = f
        return cls(src, infos, {}, pickled)

    # -- access ------------------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names in on-disk order (file, then offset), for sequential reads."""
        return sorted(self._infos, key=lambda n: (str(self._infos[n].file), self._infos[n].begin))

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` in its stored dtype (float32 for a block-scaled fp8 weight)."""
        info = self._infos[name]
        if name in self._scaled:
            b = self._scaled[name]
            stop = b.weight.shape[0] if stop is None else stop
            return b.dequantize(read_rows(b.weight, start, stop), read_rows(b.scale, *b.scale_rows(start, stop)), start)
        if name in self._refused:
            raise refused_error(name, info, self._refused[name])
        if name in self._pickled:
            if self._pickle_cache is None or self._pickle_cache[0] != info.file:
                self._pickle_cache = (info.file, torch.load(info.file, map_location="cpu",
                                                            weights_only=True, mmap=True))
            t = self._pickle_cache[1][name]
            return t.clone() if t.dim() == 0 else t[start:stop].clone()
        return read_rows(info, start, stop)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every tensor, one at a time."""
        for name in self.names():
            yield name, self.read(name)

    def iter_stored(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) exactly as stored, fp8 weights and their scales included: what a vLLM engine started
        from this folder (with its quantization_config) loads in place."""
        if not self._scaled and not self._refused:
            yield from self.iter_tensors()
            return
        for name in sorted(self._stored, key=lambda n: (str(self._stored[n].file), self._stored[n].begin)):
            yield name, read_rows(self._stored[name])

    def files(self) -> list[Path]:
        """The weight files the tensors are read from (shards, a single file, or pickles), sorted."""
        return sorted({i.file for i in self._infos.values()})

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def float_dtype(self) -> torch.dtype:
        """The most common floating dtype by bytes (the checkpoint's dtype)."""
        c = Counter()
        for i in self._infos.values():
            if i.dtype.is_floating_point:
                c[i.dtype] += i.nbytes
        return c.most_common(1)[0][0] if c else torch.float32

    @property
    def folder(self) -> Path:
        return self.source.path if self.source.path.is_dir() else self.source.path.parent

    def config(self) -> dict:
        """config.json of the folder ({} without one), as the weights read here are: without an fp8
        `quantization_config` once they read as float32 (tvtool.io.fp8)."""
        cfg = self._stored_config()
        if self._scaled:
            cfg.pop("quantization_config", None)
        return cfg

    def _stored_config(self) -> dict:
        f = self.folder / "config.json"
        return model_config(f) if f.is_file() else {}

    def side_files(self) -> dict[str, bytes]:
        """config/tokenizer/chat-template/generation files of the folder, by file name (config.json as
        `config()` gives it)."""
        if not self.source.path.is_dir():
            return {}
        out = {}
        for f in sorted(self.source.path.iterdir()):
            if f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in SIDE_PATTERNS):
                out[f.name] = f.read_bytes()
        if "config.json" in out:
            model_config(self.source.path)  # a broken config.json is named as such, not as a merge or load failure
            if self._scaled:
                out["config.json"] = unquantized_config(out["config.json"])
        return out


def model_config(path: str | os.PathLike) -> dict:
    """A model's config.json as a dict; a file that is not a JSON object is one CheckpointError naming it
    (read before the tokenizer or an engine would report it as something else)."""
    f = Path(path)
    f = f / "config.json" if f.is_dir() else f
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"config.json is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})",
                              where=str(f), fix="restore the file (re-download the model's config.json)") from None
    except UnicodeDecodeError:
        raise CheckpointError("config.json is not UTF-8 text", where=str(f),
                              fix="restore the file (re-download the model's config.json)") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"config.json is a JSON {type(cfg).__name__}, not an object", where=str(f),
                              fix="restore the file (re-download the model's config.json)")
    return cfg
