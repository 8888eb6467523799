"""Training data for `tvtool train`: MixChain folders, the released MixChain-Z layout, or jsonl pairs.

Accepted inputs (one row per question):
  - a folder written by `tvtool mixchain` (data/*.parquet, mixchain.json), or any folder/.parquet/
    .jsonl file with the released MixChain-Z columns: `question`, `solution_0..K`, optionally
    `solution_k_token`, `correct_k`, and (tvtool) `beta_k`;
  - a .jsonl of `question`/`solution` pairs (optionally `beta` per pair, for valve++).
A missing (filtered) solution, null or empty, is skipped.

β (CoT-Valve eq. 4) per solution: the `beta_k` column when the data has one; otherwise computed
over the row's present solutions from `solution_k_token` when every present solution has one,
else from lengths counted with the model's tokenizer (`tvtool.valve.mixchain.solution_length`: the
emitted ids plus EOS, the one rule MixChain uses).

Encoding: the prompt is `tvtool.evaluation.generate.build_prompt` (exactly what `tvtool eval` sends), the
target is the solution's ids (no special tokens) plus EOS; only the target is in the loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tvtool.errors import DatasetError, OptionsError
from tvtool.engine.prompting import PromptOptions, build_prompt, uses_chat_template
from tvtool.evaluation.data import json_kind
from tvtool.valve.mixchain_length import betas, solution_length

_SOL = re.compile(r"^solution_(\d+)$")
IGNORE = -100  # label of a position outside the loss


@dataclass(frozen=True)
class Sample:
    question: str
    solution: str
    beta: float  # the LoRA branch's scale for this sample (1 for valve and progressive)
    column: str  # where the solution came from (solution_k, or solution for pairs)


@dataclass(frozen=True)
class Encoded:
    input_ids: tuple[int, ...]  # prompt ids + solution ids + EOS
    n_prompt: int  # the first n_prompt positions are outside the loss
    beta: float

    @property
    def n_target(self) -> int:
        return len(self.input_ids) - self.n_prompt


@dataclass(frozen=True)
class TrainData:
    path: Path
    layout: str  # "mixchain" | "pairs"
    rows: list[dict]
    columns: list[str]  # solution columns: solution_0..K by index, or ["solution"]
    files: list[Path]  # the files read (fingerprinted)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()


def _data_files(p: Path) -> list[Path]:
    if p.is_file():
        return [p]
    if p.is_dir():
        parquet = sorted(p.glob("data/*.parquet")) or sorted(p.glob("*.parquet"))
        if parquet:
            return parquet
        jsonl = sorted(p.glob("*.jsonl"))
        if len(jsonl) == 1:
            return jsonl
    raise DatasetError("no training data found (no data/*.parquet, .parquet or single .jsonl)", where=str(p),
                       fix="pass a `tvtool mixchain` folder, a MixChain-Z .parquet/.jsonl, or a .jsonl of "
                           "question/solution pairs")


def _read(f: Path) -> list[tuple[str, dict]]:
    """(where, row) per row of one file: where is "<file>, line N" (jsonl) or "<file>, row N" (parquet)."""
    if f.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return [(f"{f}, row {i}", r) for i, r in enumerate(pq.read_table(f).to_pylist(), 1)]
        except Exception as e:  # pyarrow raises several types for bad files
            raise DatasetError(f"cannot read parquet: {type(e).__name__}", where=str(f),
                               fix="rebuild the dataset") from None
    rows = []
    try:
        with open(f, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise DatasetError(f"a JSON {json_kind(row)}, not an object", where=f"{f}, line {i}",
                                           fix=ROW_FIX)
                    rows.append((f"{f}, line {i}", row))
    except json.JSONDecodeError as e:
        raise DatasetError(f"line {i} is not JSON: {e.msg}", where=str(f), fix="one JSON object per line") from None
    except UnicodeDecodeError:
        raise DatasetError("not UTF-8 text", where=str(f), fix="pass a UTF-8 .jsonl file (or a .parquet)") from None
    except OSError as e:
        raise DatasetError(f"cannot read: {e.strerror}", where=str(f)) from None
    return rows


ROW_FIX = ("each row must be one JSON object with question text and solution_0..K (MixChain) or solution "
           "(question/solution pairs)")


def load_train_data(path: str | os.PathLike) -> TrainData:
    """Rows and layout of a training dataset; checks the columns every mode needs."""
    p = Path(path)
    if not p.exists():
        raise DatasetError("training data not found", where=str(p), fix="check the --data path")
    files = _data_files(p)
    read = [wr for f in files for wr in _read(f)]
    if not read:
        raise DatasetError("the training data has no rows", where=str(p))
    for where, r in read:
        if not isinstance(r.get("question"), str):
            what = ("the row has no 'question'" if r.get("question") is None else
                    f"'question' is a JSON {json_kind(r['question'])}, not text")
            raise DatasetError(what, where=where, fix=ROW_FIX)
    rows = [r for _, r in read]
    keys = set().union(*(r.keys() for r in rows[:100]))
    sols = sorted((k for k in keys if _SOL.match(k)), key=lambda k: int(_SOL.match(k).group(1)))
    if sols:
        gaps = [f"solution_{k}" for k in range(int(_SOL.match(sols[-1]).group(1))) if f"solution_{k}" not in sols]
        if gaps:  # a stage of progressive training (and a β of valve++) would silently be missing
            raise DatasetError(f"the MixChain data has {sols[-1]} but no {', '.join(gaps)}", where=str(p),
                               fix="pass the complete MixChain (columns solution_0..K), or rebuild it with "
                                   "tvtool mixchain")
        return TrainData(p, "mixchain", rows, sols, files)
    if "solution" in keys:
        return TrainData(p, "pairs", rows, ["solution"], files)
    raise DatasetError("the training data has no solution columns (solution_0..K, or solution)", where=str(p),
                       fix="pass a MixChain dataset, or .jsonl rows with question and solution")


def _present(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _row_betas(row: dict, cols: Sequence[str], tokenizer: Any) -> dict[str, float]:
    """β per present solution of a row (eq. 4): stored beta_k, else from token counts."""

    present = [c for c in cols if _present(row.get(c))]
    stored = {c: row.get(c.replace("solution_", "beta_")) for c in present}
    if all(isinstance(v, (int, float)) for v in stored.values()):
        return {c: float(v) for c, v in stored.items()}
    counts = {c: row.get(c + "_token") for c in present}
    if not all(isinstance(v, int) for v in counts.values()):
        counts = {c: solution_length(text=row[c], tokenizer=tokenizer) for c in present}
    return dict(zip(present, betas([counts[c] for c in present])))


def stages_for(*, mode: str, data: TrainData, tokenizer: Any, column: str | None = None) -> list[tuple[str, list[Sample]]]:
    """The training stages of `mode`: [(name, samples)].

    valve: one stage on `column` (default solution_0, or solution for pairs), β = 1;
    valve++: one stage, every present solution with its β;
    progressive: solution_K, …, solution_1, then solution_0 (longest to shortest), β = 1 each.
    """
    where = str(data.path)
    if mode == "valve":
        col = column or ("solution_0" if data.layout == "mixchain" else "solution")
        if col not in data.columns:
            raise DatasetError(f"the training data has no column {col!r}", where=where,
                               fix=f"pick --column from {', '.join(data.columns)}")
        stages = [(col, [Sample(r["question"], r[col], 1.0, col) for r in data.rows if _present(r.get(col))])]
    elif mode == "valve++":
        if data.layout == "pairs":
            if not all(isinstance(r.get("beta"), (int, float)) for r in data.rows if _present(r.get("solution"))):
                raise DatasetError("valve++ needs a β per sample: the pairs have no numeric 'beta' field",
                                   where=where, fix="pass a MixChain dataset (solution_0..K), or add beta to each pair")
            stages = [("valve++", [Sample(r["question"], r["solution"], float(r["beta"]), "solution")
                                   for r in data.rows if _present(r.get("solution"))])]
        else:
            samples = []
            for r in data.rows:
                for c, b in _row_betas(r, data.columns, tokenizer).items():
                    samples.append(Sample(r["question"], r[c], b, c))
            stages = [("valve++", samples)]
    elif mode == "progressive":
        if data.layout != "mixchain" or len(data.columns) < 2:
            raise DatasetError("progressive training needs MixChain solution columns solution_0..K (K ≥ 1)",
                               where=where, fix="pass a MixChain dataset")
        order = data.columns[1:][::-1] + data.columns[:1]  # solution_K … solution_1, solution_0
        stages = [(c, [Sample(r["question"], r[c], 1.0, c) for r in data.rows if _present(r.get(c))]) for c in order]
        empty = [c for c, samples in stages if not samples]
        if empty and len(empty) < len(stages):  # e.g. an α whose chains were all wrong (--min-correct any)
            warnings.warn(f"progressive training skips stage{'s' * (len(empty) > 1)} {', '.join(empty)}: no row has "
                          f"a solution there ({where})", stacklevel=2)
        stages = [s for s in stages if s[1]]
    else:
        raise OptionsError(f"unknown mode {mode!r}", where="MODE", fix="use valve, valve++ or progressive")
    if not any(s for _, s in stages):
        raise DatasetError("the training data has no kept solutions (every solution is empty)", where=where,
                           fix="rebuild the MixChain with a looser --min-correct, or check its generations")
    return stages


def encode(*, samples: Sequence[Sample], tokenizer: Any, prompt: PromptOptions,
           max_seq_len: int) -> tuple[list[Encoded], int]:
    """(encoded samples, how many were longer than max_seq_len and skipped)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise OptionsError("the tokenizer has no EOS token", fix="set eos_token in the model's tokenizer_config.json")
    special = not uses_chat_template(tokenizer=tokenizer, options=prompt)
    out, skipped = [], 0
    for s in samples:
        p = tokenizer(build_prompt(question=s.question, tokenizer=tokenizer, options=prompt),
                      add_special_tokens=special)["input_ids"]
        t = tokenizer(s.solution, add_special_tokens=False)["input_ids"] + [eos]
        if len(p) + len(t) > max_seq_len:
            skipped += 1
            continue
        out.append(Encoded(tuple(p + t), len(p), s.beta))
    return out, skipped


def collate(batch: Sequence[Encoded], *, pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, labels (-100 off the target), beta [B]."""
    import torch

    n = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        mask[i, :k] = 1
        labels[i, e.n_prompt:k] = ids[i, e.n_prompt:k]
    beta = torch.tensor([e.beta for e in batch], dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "beta": beta}


def micro_batches(*, idx: Sequence[int], lengths: Sequence[int], world: int, grad_accum: int,
                  by_length: bool = False) -> list[list[list[int]]]:
    """One step's samples `idx` as [process][micro-batch] index lists (sizes differ by at most one).

    Plain: process r takes idx[r::world], its micro-batch k every grad_accum-th of those. By length: the
    step's samples sorted by length (longest first; ties keep the seeded order) are cut into
    world × grad_accum runs of neighbours, and micro-batch k of every process gets one of the k-th longest
    runs, so the processes of one micro-step wait on similar lengths. The step's sample set (and so its
    loss, the token mean over all of them) is the same either way."""
    if not by_length:
        return [[list(idx[r::world])[k::grad_accum] for k in range(grad_accum)] for r in range(world)]
    order = sorted(idx, key=lambda i: -lengths[i])  # stable
    g, n = world * grad_accum, len(order)
    ends = [0]
    for j in range(g):  # the first n mod g runs take one more: a short step fills every process's first micro-batch
        ends.append(ends[-1] + n // g + (j < n % g))
    runs = [order[ends[j]:ends[j + 1]] for j in range(g)]
    return [[runs[k * world + r] for k in range(grad_accum)] for r in range(world)]


def padding(parts: Sequence[Sequence[Sequence[int]]], lengths: Sequence[int]) -> tuple[int, int]:
    """(padded positions, all positions) of the micro-batches `parts` ([process][micro-batch] indices), each
    right-padded to its longest sample."""
    pad = total = 0
    for micro in (m for proc in parts for m in proc if m):
        longest = max(lengths[i] for i in micro)
        total += longest * len(micro)
        pad += sum(longest - lengths[i] for i in micro)
    return pad, total


__all__ = ["Encoded", "IGNORE", "Sample", "TrainData", "collate", "encode", "load_train_data", "micro_batches",
           "padding", "stages_for"]
