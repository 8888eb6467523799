"""The one rule for finished work: a stage is finished when its record holds the same fingerprint.

A record is what a stage's output depends on, and nothing else:

    {"stage": "materialize", "options": {...}, "inputs": {"base": {...}, "delta": {...}},
     "fingerprint": sha256(stage, options, inputs)}

`options` are the settings that change the output (never paths: a moved or copied output
folder still resumes); `inputs` are content fingerprints by role: a checkpoint's files (size
and header hash, `tvtool.io.fingerprint.input_fingerprint`), a delta's own (its header carries the record of
the stage that wrote it, so a delta rewritten from other inputs has another one), a dataset
file's hash (`dataset_fingerprint`). Each stage writes its record last, atomically (with its
output's rename, or as the last file), and on a re-run `is_finished` compares fingerprints: the
same → skip; none → do; another → say what changed in one line and redo (with `overwrite`, as
`sweep` passes for its own stage folders), or refuse.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from tvtool.io.atomic import write_json
from tvtool.errors import OutputError
from tvtool.io.safetensors_io import read_header

RECORD_KEY = "record"  # the key of the record in a stage's JSON file (tvtool.json, run.json, …)
META_KEY = "tvtool.record"  # … or in a safetensors output's metadata (delta, factored delta)


def _plain(x: Any) -> Any:
    """JSON-normal form (tuples → lists, non-JSON → str), so a record equals its reloaded self."""
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def stage_record(*, stage: str, options: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict:
    """The record of one stage's output: its options, its inputs' fingerprints, and their sha256."""
    body = {"stage": stage, "options": _plain(dict(options)), "inputs": _plain(dict(inputs))}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return {**body, "fingerprint": hashlib.sha256(blob).hexdigest()}


def dataset_fingerprint(source: str | os.PathLike, **what: Any) -> dict:
    """A dataset's content: the sha256 of its file (or its Hub id when not a local file), plus `what`
    (name, split, kind…)."""
    p = Path(source)
    if p.is_file():
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return {"sha256": h.hexdigest(), **what}
    return {"hub": str(source), **what}


def read_record(path: str | os.PathLike) -> dict | None:
    """The record stored at `path`: a JSON file holding `record`, or a safetensors file (or a folder
    of shards) holding it in its metadata. None when absent or unreadable."""
    p = Path(path)
    try:
        if p.suffix == ".json":
            rec = json.loads(p.read_text(encoding="utf-8")).get(RECORD_KEY)
        else:
            files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
            if not files:
                return None
            rec = json.loads(read_header(files[0])[1].get(META_KEY, "null"))
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    except Exception:  # a damaged output (CheckpointError from the header check) is not finished
        return None
    return rec if isinstance(rec, dict) and "fingerprint" in rec else None


def changes(old: dict | None, new: dict) -> str:
    """What differs between two records, in a few words: 'rank 2 → 32', 'base changed'."""
    if not old:
        return "no record"
    out = []
    oo, no = _flat(old.get("options") or {}), _flat(new.get("options") or {})
    for k in sorted(set(oo) | set(no)):
        if oo.get(k) != no.get(k):
            out.append(f"{k} {_short(oo.get(k))} → {_short(no.get(k))}")
    oi, ni = old.get("inputs") or {}, new.get("inputs") or {}
    out += [f"{k} changed" for k in sorted(set(oi) | set(ni)) if oi.get(k) != ni.get(k)]
    if old.get("stage") != new.get("stage"):
        out.insert(0, f"stage {old.get('stage')} → {new.get('stage')}")
    return ", ".join(out[:4]) + (", …" if len(out) > 4 else "") if out else "tvtool version"


def _flat(d: dict, prefix: str = "") -> dict:
    """{"engine": {"dtype": x}} → {"engine.dtype": x}: a change is named by its leaf."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True, default=str) if not isinstance(v, str) else v
    return s if len(s) <= 40 else s[:37] + "…"


def say(message: str) -> None:
    """One line on stderr (through tqdm, so progress bars stay intact)."""
    from tqdm.auto import tqdm

    tqdm.write(f"tvtool: {message}", file=sys.stderr)


def finished_state(output: str | os.PathLike, record: dict, *, name: str | None = None) -> tuple[str, str]:
    """Where `output` stands against `record`, reading only: ("finished", "") when its stored record has the
    same fingerprint; ("absent", "") when there is no output; else ("changed", what differs in a few words).
    `is_finished` acts on it; `sweep --plan` reports it."""
    state, old = _compare(output, record, name)
    return state, changes(old, record) if state == "changed" else ""


def _compare(output: str | os.PathLike, record: dict, name: str | None) -> tuple[str, dict | None]:
    old = read_record(Path(output) / name if name else Path(output))
    if old is not None and old.get("fingerprint") == record["fingerprint"]:
        return "finished", old
    return ("absent" if not Path(output).exists() else "changed"), old


def is_finished(output: str | os.PathLike, record: dict, *, overwrite: bool, what: str,
                name: str | None = None) -> bool:
    """True when the record stored with `output` has `record`'s fingerprint (skip the stage).

    The record is read from `output/name` (a JSON file), or with no `name` from `output` itself (a
    JSON file, or a safetensors file or folder holding it in its metadata). False when `output` is
    absent (do it), or when another record (or none) is there and `overwrite` is set: then one line
    says what changed and that `what` is redone. Without `overwrite`, an output made from other
    inputs or options is an OutputError naming the change.
    """
    state, old = _compare(output, record, name)
    if state != "changed":
        return state == "finished"
    change = changes(old, record)
    if not overwrite:
        what_is = ("the output already exists, with no tvtool record of how it was made" if old is None else
                   f"the output holds a result made from other inputs or options ({change})")
        raise OutputError(what_is, where=str(output), fix="pass --overwrite to redo it, or choose another output")
    say(f"{change}: redoing {what}")
    return False


def write_record(folder: str | os.PathLike, record: dict, *, name: str, extra: Mapping[str, Any] = ()) -> Path:
    """Write `{**extra, "record": record}` as `folder/name`, atomically: call it last."""
    return write_json(Path(folder) / name, {**dict(extra), RECORD_KEY: record})


__all__ = ["META_KEY", "RECORD_KEY", "changes", "dataset_fingerprint", "finished_state", "is_finished", "read_record", "say",
           "stage_record", "write_record"]
