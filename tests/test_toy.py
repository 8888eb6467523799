"""Fast tests of the bundled toy pair: generator, tokenizer, shipped checkpoints, jsonl files."""

from __future__ import annotations

import json
import random

import pytest

from tvtool import toy
from tvtool.vectors.taskvector import TaskVector
from tvtool.merge.stream import apply_to


def test_generator_is_deterministic_for_a_seed():
    a = toy.make_problems(n=50, seed=7)
    assert a == toy.make_problems(n=50, seed=7)
    assert a != toy.make_problems(n=50, seed=8)
    rng1, rng2 = random.Random(3), random.Random(3)
    assert [toy.random_pieces(rng=rng1, p=0.3) for _ in range(20)] == [
        toy.random_pieces(rng=rng2, p=0.3) for _ in range(20)]


def test_answers_follow_the_steps_and_stay_small():
    for p in toy.make_problems(n=500, seed=0):
        assert 2 <= len(p.steps) <= 3
        assert p.answer == p.start + sum(p.steps)
        assert 0 <= p.answer <= 99
        assert all(0 <= v <= toy.MAX_VALUE for v in p.values)
        for k in p.steps:
            phrase = f"gets {k} more" if k > 0 else f"gives away {-k}"
            assert phrase in toy.question_text(problem=p)


def test_every_solution_ends_in_boxed_answer():
    rng = random.Random(0)
    for p in toy.make_problems(n=200, seed=1):
        for pieces in (toy.NO_PIECES, toy.ALL_PIECES, toy.random_pieces(rng=rng, p=0.5)):
            sol = toy.render_solution(problem=p, pieces=pieces)
            assert sol.endswith(f"\\boxed{{ {p.answer} }}")
            assert toy.parse_answer(text=sol) == p.answer
    p = toy.make_problems(n=1, seed=2)[0]
    short = toy.render_solution(problem=p, pieces=toy.NO_PIECES)
    long = toy.render_solution(problem=p, pieces=toy.ALL_PIECES)
    assert len(long.split()) > 4 * len(short.split())


def test_worded_steps_repeat_the_amount_next_to_the_operation():
    for p in toy.make_problems(n=100, seed=5):
        sol = toy.render_solution(problem=p, pieces=toy.Pieces(words=True))
        for v, k in zip(p.values, p.steps):
            phrase = f"gets {k} more" if k > 0 else f"gives away {-k}"
            op = f"{v} + {k} = {v + k}" if k > 0 else f"{v} - {-k} = {v + k}"
            assert f"{phrase} , so {op} ." in sol


def test_parse_answer_takes_the_last_box():
    assert toy.parse_answer(text="\\boxed{ 3 } then \\boxed{ 42 }") == 42
    assert toy.parse_answer(text="no box") is None


@pytest.fixture(scope="module")
def shipped_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(toy.BASE_DIR))


def test_shipped_tokenizer_round_trips_without_unk(shipped_tokenizer):
    tok = shipped_tokenizer
    for p in toy.make_problems(n=50, seed=3):
        for text in (toy.question_text(problem=p), toy.render_solution(problem=p, pieces=toy.ALL_PIECES)):
            ids = tok.encode(text, add_special_tokens=False)
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == text
            assert tok.decode(ids).split() == text.split()
    assert len(tok.encode("\\boxed{", add_special_tokens=False)) == 1
    assert tok.encode("zyzzyva", add_special_tokens=False) == [tok.unk_token_id]
    assert tok.eos_token == toy.EOS and tok.bos_token == toy.BOS


def test_shipped_tokenizer_matches_the_built_one(shipped_tokenizer):
    assert shipped_tokenizer.get_vocab() == toy.build_tokenizer().get_vocab()


def test_chat_template_gives_the_training_prompt(shipped_tokenizer):
    q = toy.question_text(problem=toy.make_problems(n=1, seed=4)[0])
    msgs = [{"role": "system", "content": "ignored"}, {"role": "user", "content": q}]
    text = shipped_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == toy.prompt_text(question=q)
    ids = shipped_tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == shipped_tokenizer.bos_token_id and shipped_tokenizer.unk_token_id not in ids
    assert shipped_tokenizer.encode(text) == ids  # no second BOS added


@pytest.mark.parametrize("path", [toy.BASE_DIR, toy.REASONER_DIR], ids=["base", "reasoner"])
def test_shipped_checkpoint_loads(path):
    import torch
    from transformers import AutoConfig, GenerationConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(str(path))
    assert cfg.model_type == "llama"
    assert cfg.head_dim == 64 and cfg.hidden_size // cfg.num_attention_heads == 64
    assert cfg.tie_word_embeddings is False
    state = toy.load_state(path=path)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert "lm_head.weight" in state
    assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    model = LlamaForCausalLM.from_pretrained(str(path))
    n = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n < 3e6
    gen = GenerationConfig.from_pretrained(str(path))
    tok_eos = json.loads((path / "tokenizer_config.json").read_text()).get("eos_token")
    assert tok_eos == toy.EOS
    assert gen.eos_token_id == cfg.eos_token_id == toy.vocabulary().index(toy.EOS)


def test_base_and_reasoner_line_up():
    base, reasoner = toy.load_state(path=toy.BASE_DIR), toy.load_state(path=toy.REASONER_DIR)
    assert base.keys() == reasoner.keys()
    assert all(base[k].shape == reasoner[k].shape for k in base)
    merged = dict(apply_to(TaskVector.between(toy.BASE_DIR, toy.REASONER_DIR), toy.BASE_DIR, alpha=0.0))
    assert all((merged[k] == base[k]).all() for k in base)


def test_test_and_train_sets_are_gsm8k_style_and_disjoint():
    test = toy.read_jsonl(path=toy.TEST_PATH)
    train = toy.read_jsonl(path=toy.TRAIN_PATH)
    assert len(test) >= 200 and len(train) >= 200
    assert not {r["question"] for r in test} & {r["question"] for r in train}
    assert len({r["question"] for r in test}) == len(test)
    for r in test + train:
        work, gold = r["answer"].rsplit("\n#### ", 1)
        assert int(gold) == r["gold"] and 0 <= r["gold"] <= 99
        assert work.strip()


def test_loading_the_toy_model_leaves_gradients_on():
    """load_model must not switch autograd off for the whole process (training after it would learn nothing)."""
    import torch

    model = toy.load_model(path=toy.BASE_DIR)
    assert torch.is_grad_enabled()
    model.train()
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
