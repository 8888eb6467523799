"""Thinking models: the answer after the last `</think>`, unfinished thinking, thinking/answer token counts.

The forms a response takes:
- DeepSeek-R1-Distill: the chat template pre-fills `<think>\\n`, so the response holds only the closing
  tag: `…reasoning…</think>answer`;
- QwQ-32B, Qwen3 (or a template that does not pre-fill): `<think>…</think>answer`;
- QwQ-32B-Preview, and non-thinking models: no tags; the whole response is the answer.

With a delimiter in effect (`AnswerOptions.think_end`; `auto` detects `</think>` from the chat template
or the outputs, `detect_think_end`):
- finished: the answer rule reads only the text after the LAST delimiter, so a `\\boxed{}` in the
  thinking never answers when the answer part has its own (lm-eval's `think_end_token` does the same);
- unfinished (no delimiter: thinking cut by max_tokens, or never closed): the dataset's rule reads the
  whole text, as CoT-Valve A.1 reads a response ("the last digit in the response"), and the sample is
  counted as unfinished.
Without a delimiter (none found, or `none`) nothing is split and the thinking fields are None (n/a).

Token counts are taken from the engine's token ids, never by tokenizing text again: the delimiter's
ids (`tokenizer.encode`; one added token in the R1, QwQ and Qwen3 tokenizers) are found as the last
contiguous run in the sample's ids, and the thinking ends after it. Where the delimiter was merged
with its neighbours into other tokens, the thinking ends at the shortest prefix of the ids whose
decoded text holds every delimiter of the response. Thinking tokens include the delimiter; thinking +
answer = #tokens; an unfinished sample is all thinking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from tvtool.errors import OptionsError
from tvtool.evaluation.options import AUTO, NONE

THINK_END = "</think>"


@dataclass(frozen=True)
class ThinkRead:
    """One response read with a delimiter: what the answer rule reads, and the split."""

    answer: str  # the answer part (finished), or the whole text (unfinished, or no delimiter)
    finished: bool | None  # None: no delimiter in effect
    thinking_tokens: int | None  # None: no delimiter, or no token ids/tokenizer to count with
    answer_tokens: int | None


class ThinkReader:
    """Reads responses with one delimiter (None: no split) and the tokenizer that made their token ids."""

    def __init__(self, think_end: str | None, *, tokenizer: Any = None):
        if think_end is not None and not think_end.strip():
            raise OptionsError("the thinking delimiter is empty", where="--think-end",
                               fix="pass a tag such as '</think>', or 'none'")
        self.think_end, self.tokenizer = think_end, tokenizer
        self._ids = tuple(tokenizer.encode(think_end, add_special_tokens=False)) if think_end and tokenizer \
            else ()

    def read(self, text: str, token_ids: Sequence[int] | None = None) -> ThinkRead:
        """`text` split at its last delimiter, with token counts from `token_ids` (see the module docstring)."""
        tag = self.think_end
        if tag is None:
            return ThinkRead(text, None, None, None)
        ids = list(token_ids) if token_ids is not None else None
        cut = text.rfind(tag)
        if cut < 0:
            at = _last_run(ids, self._ids) if ids is not None else None
            if at is not None and self.tokenizer is not None:  # a special token vLLM left out of the text
                k = at + len(self._ids)
                return ThinkRead(self.tokenizer.decode(ids[k:], skip_special_tokens=True), True, k, len(ids) - k)
            return ThinkRead(text, False, len(ids) if ids is not None else None, 0 if ids is not None else None)
        k = self._thinking_tokens(ids, text.count(tag))
        return ThinkRead(text[cut + len(tag):], True, k, len(ids) - k if k is not None else None)

    def _thinking_tokens(self, ids: list[int] | None, tags: int) -> int | None:
        if ids is None or self.tokenizer is None:
            return None
        at = _last_run(ids, self._ids)
        if at is not None:
            return at + len(self._ids)
        lo, hi = 1, len(ids)  # the delimiter spans other tokens: the shortest prefix holding every one of them
        while lo < hi:
            mid = (lo + hi) // 2
            if self.tokenizer.decode(ids[:mid]).count(self.think_end) >= tags:
                hi = mid
            else:
                lo = mid + 1
        return lo


def _last_run(ids: Sequence[int], run: Sequence[int]) -> int | None:
    """Start of the last occurrence of `run` as a contiguous slice of `ids`, None if absent."""
    n = len(run)
    if not n:
        return None
    for i in range(len(ids) - n, -1, -1):
        if ids[i] == run[0] and tuple(ids[i:i + n]) == tuple(run):
            return i
    return None


def detect_think_end(*, option: str, tokenizer: Any = None, responses: Iterable[str] = ()) -> tuple[str | None, str]:
    """(the delimiter to use or None, how it was chosen): `none` → (None, "off"); a tag → (tag, "option");
    `auto` → `</think>` when the tokenizer's chat template names it ("chat template") or a response holds
    it ("outputs"), else (None, "not found")."""
    if option == NONE:
        return None, "off"
    if option != AUTO:
        return option, "option"
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):  # named templates
        tpl = " ".join(map(str, tpl.values()))
    if isinstance(tpl, str) and THINK_END in tpl:
        return THINK_END, "chat template"
    if any(THINK_END in r for r in responses):
        return THINK_END, "outputs"
    return None, "not found"
