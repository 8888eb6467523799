"""Prompt control, the baseline CoT-Valve compares α against (Sec. 3.1, appendix B "Prompt Control",
Table 12, Fig. 3): ask for a token budget in the prompt and measure how many tokens come back.

The paper's templates, quoted from appendix B ("Prompt Template for ..."):

QwQ-32B-Preview
    System: You are a helpful and harmless assistant. You are Qwen developed by Alibaba. You should
    think step-by-step.
    User: Generate the solution in less than <token_count> tokens. <Question>

LLaMA-3.2-1B-Instruct
    System: Cutting Knowledge Date: December 2023 / Today Date: 01 Jan 2025
    User: Given the following problem, reason and give a final answer to the problem using less than
    <token_count> tokens.
    <Question>
  (That system text is what Llama 3's own chat template writes, with the day's date; so this
  template sets no system message of its own and leaves it to the chat template.)

A budget run replaces the user message by the template (no extra instruction is appended); the
record of the run (run.json `settings.model`) carries the budget and the template, so its folder
`budget-<N>/` is never mixed with another budget's results. In the report each budget is a row
with the requested budget next to the generated mean #tokens (Table 12's two columns).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from tvtool.evaluation.data import ProblemSet
from tvtool.errors import OptionsError
from tvtool.engine.prompting import PromptOptions


@dataclass(frozen=True)
class BudgetTemplate:
    system: str | None  # None: keep the run's system prompt (or the chat template's default)
    user: str  # with {budget} and {question}


TEMPLATES = {
    "qwq": BudgetTemplate(system="You are a helpful and harmless assistant. You are Qwen developed by Alibaba. "
                                 "You should think step-by-step.",
                          user="Generate the solution in less than {budget} tokens. {question}"),
    "llama": BudgetTemplate(system=None,
                            user="Given the following problem, reason and give a final answer to the problem "
                                 "using less than {budget} tokens.\n{question}"),
}


def budget_variants(*, problems: ProblemSet, prompt: PromptOptions, budgets: Sequence[int],
                    template: str) -> list[tuple[int, ProblemSet, PromptOptions, dict]]:
    """Per budget: (budget, the problems with the templated question, prompt options, what to
    record in the run's model settings)."""
    if template not in TEMPLATES:
        raise OptionsError(f"unknown budget template {template!r}", where="--budget-template",
                           fix=f"use one of: {', '.join(TEMPLATES)}")
    bad = [b for b in budgets if not isinstance(b, int) or isinstance(b, bool) or b < 1]
    if bad:
        raise OptionsError(f"prompt budgets must be positive integers, got {bad}", where="--prompt-budget",
                           fix="give token counts such as 20,50,100")
    t = TEMPLATES[template]
    opts = replace(prompt, instruction="", system_prompt=t.system or prompt.system_prompt)
    out = []
    for b in dict.fromkeys(budgets):
        ps = replace(problems, problems=tuple(replace(p, question=t.user.format(budget=b, question=p.question))
                                              for p in problems))
        out.append((b, ps, opts, {"prompt_budget": b, "budget_template": template}))
    return out
