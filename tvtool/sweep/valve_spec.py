"""The CoT-Valve stages of a recipe (issues 13, 15): `mixchain:` (MixChain-Z from θ1 + αΔ, §3.2)
and `train:` (valves trained with `tvtool train`, each swept over α). Plain frozen dataclasses
nested in `tvtool.sweep.recipe`'s schema; `check_valve_stages` says what the types cannot."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Sequence

from tvtool.errors import OptionsError
from tvtool.options import opt
from tvtool.valve.options import TrainOptions, resolve


@dataclass(frozen=True)
class MixChainSpec:
    dataset: str = opt("gsm8k", "Questions with gold answers (relative paths: from the recipe's folder).")
    split: str = opt("train", "Dataset split.")
    limit: int | None = opt(None, "Only the first N questions.")
    alphas: tuple[float, ...] = opt((0.2, 0.4, 0.6, 0.8), "α values, one solution each (paper: 0.2 0.4 0.6 0.8).")
    min_correct: str = opt("all", "all | any | a number: correct generated solutions a question needs.")
    max_tokens: int | None = opt(None, "Overrides sampling.max_tokens (clamped to the context in any case).")


@dataclass(frozen=True)
class TrainSpec:
    name: str = dataclasses.field(metadata={"help": "Name of the trained valve (folder train/<name>, report label)."})
    mode: Literal["valve", "valve++", "progressive"] = opt("valve++", "valve | valve++ | progressive.")
    model: str = opt("reasoner", "The θ the LoRA is trained on: reasoner, base, or a model path.")
    data: str = opt("mixchain", "mixchain (the recipe's MixChain stage) or a dataset path.")
    alphas: tuple[float, ...] = opt((1.0,), "α values of the valve's in-engine sweep (θ + α·Δθ).")
    options: TrainOptions = opt(TrainOptions(), "`tvtool train` options.")


def check_valve_stages(*, mixchain: MixChainSpec | None, train: Sequence[TrainSpec]) -> None:
    """Raise OptionsError(where = the recipe field path) for what the field types cannot say."""
    from tvtool.valve.options import parse_min_correct

    if mixchain is not None:
        if not mixchain.alphas:
            raise OptionsError("must list at least one α", where="mixchain.alphas", fix="e.g. alphas: [0.2, 0.4, 0.6, 0.8]")
        try:
            parse_min_correct(mixchain.min_correct, k=len(mixchain.alphas))
        except OptionsError as e:
            raise OptionsError(e.what, where="mixchain.min_correct", fix=e.fix) from None
    seen = set()
    for i, t in enumerate(train):
        if t.name in seen:
            raise OptionsError(f"repeats the name {t.name!r}", where=f"train[{i}].name",
                               fix="give each train entry a unique name")
        seen.add(t.name)
        if t.data == "mixchain" and mixchain is None:
            raise OptionsError("is mixchain but the recipe has no mixchain stage", where=f"train[{i}].data",
                               fix="add mixchain: {...}, or give a dataset path")
        if not t.alphas:
            raise OptionsError("must list at least one α", where=f"train[{i}].alphas", fix="e.g. alphas: [0, 0.5, 1]")
        try:
            resolve(t.options, mode=t.mode)
        except OptionsError as e:
            flag = (e.where or "").removeprefix("--").replace("-", "_")
            raise OptionsError(e.what, where=f"train[{i}].options.{flag}", fix=e.fix) from None


__all__ = ["MixChainSpec", "TrainSpec", "check_valve_stages"]
