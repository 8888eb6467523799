"""Prompts: the evaluated checkpoint's chat template, or a plain format.

One user message `question + "\\n" + instruction` (and a system message if given),
rendered with the checkpoint's chat template and add_generation_prompt. A tokenizer
with no chat template gets the plain format (see `build_prompt`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvtool.errors import EngineError
from tvtool.io.checkpoint import model_config
from tvtool.options import CliOptions, opt

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class PromptOptions(CliOptions):
    system_prompt: str | None = opt(None, "System message (default: none).")
    instruction: str = opt(INSTRUCTION, "Appended to every question on a new line ('' for none).")
    chat_template: bool = opt(True, "Use the checkpoint's chat template (else the plain prompt format).")


def user_text(*, question: str, options: PromptOptions) -> str:
    return f"{question}\n{options.instruction}" if options.instruction else question


def build_prompt(*, question: str, tokenizer: Any, options: PromptOptions) -> str:
    """The prompt text for one question.

    With a chat template: messages [system?, user] rendered with add_generation_prompt.
    Without one (or chat_template=False), the plain format:
        "{system}\\n\\n" (only with a system prompt) + "Question: {question}\\n{instruction}\\nAnswer:"
    """
    text = user_text(question=question, options=options)
    if options.chat_template and getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": options.system_prompt}] if options.system_prompt else [])
        msgs.append({"role": "user", "content": text})
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    head = f"{options.system_prompt}\n\n" if options.system_prompt else ""
    return f"{head}Question: {text}\nAnswer:"


def uses_chat_template(*, tokenizer: Any, options: PromptOptions) -> bool:
    """Chat-templated prompts carry their own special tokens (no BOS is added on tokenizing)."""
    return bool(options.chat_template and getattr(tokenizer, "chat_template", None))


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of a model folder (or Hub id), as transformers loads it."""
    from transformers import AutoTokenizer  # heavy: imported on first use, not with the CLI

    if (Path(path) / "config.json").is_file():  # transformers reads it too: a broken one is not a tokenizer problem
        model_config(path)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise EngineError(f"cannot load the tokenizer: {type(e).__name__}", where=str(path),
                          fix="point at a model folder with tokenizer files") from e
