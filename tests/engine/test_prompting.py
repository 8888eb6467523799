"""Prompting: the checkpoint's chat template, the plain format, system prompt and instruction."""

from __future__ import annotations

from tvtool.engine.prompting import INSTRUCTION, PromptOptions, build_prompt, load_tokenizer, uses_chat_template


def test_chat_template_default_instruction(llama):
    base, reasoner = llama
    tok = load_tokenizer(reasoner)  # template: "{% for m %}think {{content}} {% endfor %}step"
    p = build_prompt(question="what is 2 + 2", tokenizer=tok, options=PromptOptions())
    assert p == f"think what is 2 + 2\n{INSTRUCTION} step"
    assert uses_chat_template(tokenizer=tok, options=PromptOptions())


def test_chat_template_system_prompt_and_custom_instruction(llama):
    tok = load_tokenizer(llama[0])  # template: "{% for m %}{{content}} {% endfor %}"
    opts = PromptOptions(system_prompt="be brief", instruction="answer now")
    assert build_prompt(question="q1", tokenizer=tok, options=opts) == "be brief q1\nanswer now "
    assert build_prompt(question="q1", tokenizer=tok, options=PromptOptions(instruction="")) == "q1 "


def test_plain_format_without_chat_template(llama):
    tok = load_tokenizer(llama[0])
    tok.chat_template = None
    assert not uses_chat_template(tokenizer=tok, options=PromptOptions())
    assert build_prompt(question="q1", tokenizer=tok, options=PromptOptions()) == \
        f"Question: q1\n{INSTRUCTION}\nAnswer:"
    opts = PromptOptions(system_prompt="sys", instruction="")
    assert build_prompt(question="q1", tokenizer=tok, options=opts) == "sys\n\nQuestion: q1\nAnswer:"


def test_chat_template_can_be_turned_off(llama):
    tok = load_tokenizer(llama[0])
    opts = PromptOptions(chat_template=False, instruction="go")
    assert build_prompt(question="q1", tokenizer=tok, options=opts) == "Question: q1\ngo\nAnswer:"
