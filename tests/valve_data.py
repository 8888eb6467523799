"""MixChain-shaped training data from the toy generator, shared by the training tests."""

from __future__ import annotations

import json
from pathlib import Path

from tvtool import toy

LEVELS = [toy.Pieces(conclude=True), toy.Pieces(words=True, conclude=True),
          toy.Pieces(preamble=True, restate=True, words=True, conclude=True), toy.ALL_PIECES]


def mixchain_rows(n: int, *, seed: int = 7, holes: bool = True) -> list[dict]:
    """MixChain-Z rows from the toy generator: solution_0 the bare arithmetic, solution_1..4 longer
    and longer (as θ1 + αΔ writes them for α = 0.2 … 0.8); every 3rd row misses solution_2."""
    rows = []
    for i, p in enumerate(toy.make_problems(n=n, seed=seed)):
        g = toy.to_gsm8k(problem=p)
        sols = [g["answer"].split("\n####")[0]] + [toy.render_solution(problem=p, pieces=lv) for lv in LEVELS]
        if holes and i % 3 == 1:
            sols[2] = None
        row = {"question": g["question"], "answer": sols[0], "target": str(p.answer)}
        row |= {f"solution_{k}": s for k, s in enumerate(sols)}
        row |= {f"correct_{k}": s is not None for k, s in enumerate(sols) if k}
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
