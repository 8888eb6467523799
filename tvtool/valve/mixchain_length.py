"""MixChain lengths and the context budget: one rule for counting a solution's tokens, and
max_tokens clamped to what the engine's context leaves after the longest prompt.

Kept apart from `tvtool.valve.mixchain` (the verb) so the rules are small and testable alone.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from tvtool.evaluation.data import Problem
from tvtool.engine.options import EngineOptions, SamplingOptions
from tvtool.errors import OptionsError
from tvtool.engine.prompting import PromptOptions, build_prompt, uses_chat_template


def solution_length(*, text: str, tokenizer: Any) -> int:
    """Tokens a model emits for `text` as a solution: its ids (no special tokens) + the final EOS.

    The one rule for every MixChain length: a generated solution that stopped at EOS has exactly
    this many generated token ids, so solution_0 and solution_k are measured alike."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1


def clamp_max_tokens(*, max_tokens: int, context: int, longest_prompt: int) -> tuple[int, str | None]:
    """(max_tokens that fits `context` after the longest prompt, a note when it was lowered)."""
    room = context - longest_prompt
    if room < 1:
        raise OptionsError(f"the longest prompt ({longest_prompt} tokens) fills the engine's context of "
                           f"{context} tokens", where="--max-model-len",
                           fix="raise --max-model-len (within the model's limit) or shorten the prompts")
    if max_tokens <= room:
        return max_tokens, None
    return room, (f"max_tokens lowered from {max_tokens} to {room}: the context is {context} tokens and the "
                  f"longest prompt has {longest_prompt}")


def fit_context(*, problems: Sequence[Problem], tokenizer: Any, shell: str | Path, prompt: PromptOptions,
                sampling: SamplingOptions, engine_options: EngineOptions) -> tuple[SamplingOptions, str | None]:
    """`sampling` with max_tokens clamped to the context left after the longest prompt (and the note).

    The context is --max-model-len, else the model's max_position_embeddings (`shell`'s config.json)."""
    cfg = json.loads((Path(shell) / "config.json").read_text())
    context = engine_options.max_model_len or cfg.get("max_position_embeddings") or \
        cfg.get("text_config", {}).get("max_position_embeddings")
    if not context:
        return sampling, None
    special = not uses_chat_template(tokenizer=tokenizer, options=prompt)
    longest = max((len(tokenizer(build_prompt(question=p.question, tokenizer=tokenizer, options=prompt),
                                 add_special_tokens=special)["input_ids"]) for p in problems), default=0)
    n, note = clamp_max_tokens(max_tokens=sampling.max_tokens, context=int(context), longest_prompt=longest)
    return replace(sampling, max_tokens=n), note


__all__ = ["clamp_max_tokens", "fit_context", "solution_length"]



def betas(lengths: Sequence[int | None]) -> list[float | None]:
    """β = 1 − (m − m_min)/(m_max − m_min) for each present length (eq. 4), None where absent.

    One solution, or all of one length: β = 1 for each (every one is a shortest solution)."""
    present = [m for m in lengths if m is not None]
    if not present:
        return [None] * len(lengths)
    lo, hi = min(present), max(present)
    return [None if m is None else 1.0 if hi == lo else 1.0 - (m - lo) / (hi - lo) for m in lengths]
