"""Write more toy training questions (GSM8K-style jsonl), disjoint from the toy test set.

The toy train split has 400 questions; MixChain-Z for CoT-Valve++ wants more. Same generator and
distribution as the bundled splits (`tvtool.toy.make_problems`), another seed, test questions excluded.

    python scripts/make_toy_questions.py -n 2000 --seed 2025 -o recipes/data/toy-train-2000.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tvtool import toy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=2025)
    ap.add_argument("-o", "--output", type=Path, required=True)
    a = ap.parse_args()
    test = {r["question"] for r in toy.read_jsonl(path=toy.TEST_PATH)}
    out = []
    for p in toy.make_problems(n=a.n + len(test), seed=a.seed):
        if toy.question_text(problem=p) not in test:
            out.append(p)
        if len(out) == a.n:
            break
    toy.write_jsonl(path=a.output, problems=out)
    print(f"{len(out)} questions → {a.output}")


if __name__ == "__main__":
    main()
