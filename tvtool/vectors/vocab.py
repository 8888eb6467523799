"""Several task vectors of one base: same tensors and shapes, vocabulary tensors under one policy.

The vocab policy of one pair (`PairTerm.between`: "error" or "intersect") extends to several task vectors:
vocabulary tensors (embed_tokens, lm_head) whose rows differ are an error, or every vector is seen over
the rows all of them (and the base) share, so a merge runs over those rows and the others keep θ1.
"""

from __future__ import annotations

from typing import Sequence

from tvtool.errors import MismatchError
from tvtool.io.layout import is_vocab_tensor


def check_vectors(shapes: Sequence[dict[str, tuple[int, ...]]], *, vocab: str = "error",
                  base_rows: dict[str, int] | None = None, where: Sequence[str] = ()) -> dict[str, int]:
    """Task vectors must have the same tensor names and shapes (one architecture), save the rows of
    vocabulary tensors (embed_tokens, lm_head) under the vocab policy of one pair:
    "error" refuses different row counts; "intersect" returns {tensor: rows shared by every vector
    and the base (`base_rows`)} for each vocab tensor some vector has more rows of (the merge runs
    over those rows; the others keep θ1). `where[i]`: vector i's source, named in errors."""
    for i, s in enumerate(shapes[1:], 1):
        if set(s) != set(shapes[0]):
            diff = sorted(set(s) ^ set(shapes[0]))
            raise MismatchError(f"task vectors 1 and {i + 1} have different tensors, e.g. {diff[:3]}",
                                fix="merge only task vectors of one architecture from one base")
    shared = {}
    for n, first in shapes[0].items():
        got = [tuple(s[n]) for s in shapes]
        bad = next((i for i, g in enumerate(got) if g != tuple(first)), None)
        if is_vocab_tensor(n) and first and all(g and g[1:] == tuple(first[1:]) for g in got):
            if bad is not None and vocab != "intersect":
                raise MismatchError(f"vocabulary size differs for tensor {n!r}: task vector 1 has {first[0]} rows, "
                                    f"task vector {bad + 1} {got[bad][0]}",
                                    where=where[bad] if len(where) > bad else None,
                                    fix="pass --vocab intersect to merge over the rows all task vectors share "
                                        "(the other rows keep the base's values)")
            rows = [g[0] for g in got] + ([base_rows[n]] if vocab == "intersect" and n in (base_rows or {}) else [])
            if min(rows) < max(g[0] for g in got):
                shared[n] = min(rows)
        elif bad is not None:
            raise MismatchError(f"task vectors 1 and {bad + 1} differ in the shape of {n!r}: "
                                f"{tuple(first)} vs {got[bad]}",
                                fix="merge only task vectors of one architecture from one base")
    return shared


def shared_vectors(vectors: Sequence, *, vocab: str = "error", base_rows: dict[str, int] | None = None,
                   where: Sequence[str] = ()) -> list:
    """The task vectors, each seen over the vocabulary rows they all share (`check_vectors`;
    `TaskVector.shared`): what every operator then runs over. Rows keep their flat indices (row
    r of a tensor is element r·row_size onward in every vector), so DARE masks, which hash
    (seed, name, flat index), are those of the same rows without the policy; the magnitude
    cut of trim/TIES is taken over the shared rows (density of the elements that are merged)."""
    rows = check_vectors([{n: v.shape(n) for n in v.names()} for v in vectors], vocab=vocab, base_rows=base_rows,
                         where=where)
    return [v.shared(rows) if rows else v for v in vectors]


__all__ = ["check_vectors", "shared_vectors"]
