"""The bundled toy reasoning pair: arithmetic word problems, tokenizer, model config.

A question has a start value and 2-3 +/- steps; a solution is built from optional
pieces (preamble, restating the question, each step in words, a double-check pass,
"So the answer is") around the bare arithmetic, and always ends in `\\boxed{ N }`.
The base model is trained on solutions where each piece is rarely included, the
reasoner on solutions with every piece, so θ1 + αΔ moves the chain length with α.

All text is written with spaces around every token so a word-level tokenizer
(WhitespaceSplit) splits it exactly; numbers 0..999 are single tokens.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from tvtool.errors import CheckpointError, DatasetError
from tvtool.vectors.taskvector import TaskVector

ASSET_DIR = Path(__file__).parent / "assets" / "toy"
BASE_DIR = ASSET_DIR / "base"
REASONER_DIR = ASSET_DIR / "reasoner"
TEST_PATH = ASSET_DIR / "test.jsonl"
TRAIN_PATH = ASSET_DIR / "train.jsonl"
VALVE_DIR = ASSET_DIR / "valves"  # the trained ++ and +P valves of recipes/toy-valve.yaml (PEFT adapters)

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
BOXED = "\\boxed{"
MAX_NUMBER = 999  # numbers 0..MAX_NUMBER are single tokens
MAX_VALUE = 50  # start, intermediate values and answers stay in 0..MAX_VALUE
MAX_POSITIONS = 256  # prompt (< 40 tokens) + longest solution (< 170 tokens)

NAMES = ("Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Jack", "Emma")
ITEMS = ("apples", "books", "coins", "cards", "pens", "stickers", "marbles", "cookies")
PIECES = ("preamble", "restate", "words", "check", "conclude")

# The prompt the models were trained on; the tokenizer's chat template renders exactly this.
PROMPT_FORMAT = BOS + " Question : {question} Answer :"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    " Question : {{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} Answer :{% endif %}"
)


@dataclass(frozen=True)
class Problem:
    """One word problem: `start` then `steps` of signed amounts (+k gets, -k gives away)."""

    name: str
    item: str
    start: int
    steps: tuple[int, ...]

    @property
    def answer(self) -> int:
        return self.start + sum(self.steps)

    @property
    def values(self) -> list[int]:
        """Running values: start, after step 1, ..., answer."""
        out = [self.start]
        for k in self.steps:
            out.append(out[-1] + k)
        return out


@dataclass(frozen=True)
class Pieces:
    """Which optional pieces a solution includes (the arithmetic is always there)."""

    preamble: bool = False
    restate: bool = False
    words: bool = False
    check: bool = False
    conclude: bool = False


ALL_PIECES = Pieces(preamble=True, restate=True, words=True, check=True, conclude=True)
NO_PIECES = Pieces()


# --- problems ---------------------------------------------------------------


def random_problem(*, rng: random.Random) -> Problem:
    """Draw until every running value stays in 0..MAX_VALUE."""
    while True:
        n_steps = rng.choice((2, 3))
        start = rng.randint(2, 30)
        steps = tuple(rng.choice((1, -1)) * rng.randint(1, 10) for _ in range(n_steps))
        p = Problem(name=rng.choice(NAMES), item=rng.choice(ITEMS), start=start, steps=steps)
        if all(0 <= v <= MAX_VALUE for v in p.values):
            return p


def make_problems(*, n: int, seed: int, exclude: Iterable[Problem] = ()) -> list[Problem]:
    """`n` distinct problems drawn deterministically from `seed`, none in `exclude`."""
    rng = random.Random(seed)
    seen = {question_text(problem=p) for p in exclude}
    out: list[Problem] = []
    while len(out) < n:
        p = random_problem(rng=rng)
        q = question_text(problem=p)
        if q not in seen:
            seen.add(q)
            out.append(p)
    return out


def _step_phrase(k: int) -> str:
    return f"gets {k} more" if k > 0 else f"gives away {-k}"


def question_text(*, problem: Problem) -> str:
    """E.g. "Tom has 12 apples . He gets 5 more and gives away 3 . How many apples does Tom have now ?"."""
    phrases = [_step_phrase(k) for k in problem.steps]
    actions = " , ".join(phrases[:-1]) + " and " + phrases[-1]
    p = problem
    return (
        f"{p.name} has {p.start} {p.item} . {p.name} {actions} . "
        f"How many {p.item} does {p.name} have now ?"
    )


def _op(a: int, k: int) -> str:
    """"a + k = b" or "a - k = b" for a signed step k."""
    return f"{a} + {k} = {a + k}" if k > 0 else f"{a} - {-k} = {a + k}"


_ORDINALS = ("First", "Then", "After that")


def render_solution(*, problem: Problem, pieces: Pieces) -> str:
    """The solution text (no prompt, no EOS) with the given optional pieces."""
    p, vals = problem, problem.values
    parts: list[str] = []
    if pieces.preamble:
        parts.append(
            f"Let me think step by step about the {p.item} ."
        )
    if pieces.restate:
        # A summary, not a verbatim copy: two copies of the question confuse the tiny model
        # about which number to fetch, which wrecks accuracy at midway α.
        parts.append(f"{p.name} starts with {p.start} {p.item} and there are {len(p.steps)} changes .")
    for i, k in enumerate(p.steps):
        if pieces.words:
            # The amount sits right next to the operation that uses it, so the arithmetic
            # re-reads the number just written instead of reaching back into the question.
            parts.append(f"{_ORDINALS[i]} {p.name} {_step_phrase(k)} , so {_op(vals[i], k)} .")
        else:
            parts.append(f"{_op(vals[i], k)} .")
    if pieces.check:
        back = [f"{_op(vals[i + 1], -k)} ." for i, k in reversed(list(enumerate(p.steps)))]
        parts.append(
            "Let me double check backwards . " + " ".join(back) + f" That gives back {p.start} ."
        )
    if pieces.conclude:
        parts.append(f"So the answer is {p.answer} .")
    parts.append(f"{BOXED} {p.answer} }}")
    return " ".join(parts)


def random_pieces(*, rng: random.Random, p: float) -> Pieces:
    """Each piece included independently with probability `p`."""
    return Pieces(**{name: rng.random() < p for name in PIECES})


def prompt_text(*, question: str) -> str:
    """The exact training prompt for `question` (equals the chat template's output)."""
    return PROMPT_FORMAT.format(question=question)


def parse_answer(*, text: str) -> int | None:
    """Integer inside the last `\\boxed{ ... }`, or None."""
    hits = re.findall(r"\\boxed\{\s*(-?\d+)\s*\}", text)
    return int(hits[-1]) if hits else None


# --- GSM8K-style jsonl -------------------------------------------------------


def to_gsm8k(*, problem: Problem) -> dict:
    """{"question", "answer": "<short worked solution>\\n#### N"} as a GSM8K loader expects."""
    work = " ".join(f"{_op(v, k)} ." for v, k in zip(problem.values, problem.steps))
    return {"question": question_text(problem=problem), "answer": f"{work}\n#### {problem.answer}"}


def write_jsonl(*, path: Path, problems: Sequence[Problem]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for p in problems:
            f.write(json.dumps(to_gsm8k(problem=p)) + "\n")


def read_jsonl(*, path: Path) -> list[dict]:
    """Rows of a GSM8K-style jsonl; `gold` (int) is added from the "#### N" line."""
    try:
        rows = [json.loads(line) for line in open(path) if line.strip()]
        for r in rows:
            r["gold"] = int(r["answer"].rsplit("####", 1)[1].strip())
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise DatasetError(f"cannot read toy jsonl: {e}", where=str(path),
                           fix="Regenerate it with scripts/train_toy.py") from e
    return rows


# --- tokenizer and model config -----------------------------------------------


def vocabulary() -> list[str]:
    """Deterministic word list: special tokens, every template word, numbers 0..MAX_NUMBER."""
    words: set[str] = set(PROMPT_FORMAT.replace("{question}", "").split())
    for name in NAMES:
        for item in ITEMS:
            for steps in ((3, -2, 1), (-2, 3, -1), (2, -1)):
                p = Problem(name=name, item=item, start=5, steps=steps)
                words.update(question_text(problem=p).split())
                words.update(render_solution(problem=p, pieces=ALL_PIECES).split())
    numbers = [str(i) for i in range(MAX_NUMBER + 1)]
    words -= set(numbers) | {BOS, EOS, PAD, UNK}
    return [PAD, UNK, BOS, EOS] + sorted(words) + numbers


def build_tokenizer():
    """A word-level `PreTrainedTokenizerFast` with the training chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        clean_up_tokenization_spaces=False, model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_config(*, vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int):
    """Tiny `LlamaConfig` (~1.1M params) that vLLM's CPU backend runs: head_dim 64, untied."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, dtype="bfloat16",
    )


# --- merging and measuring --------------------------------------------------


def load_state(*, path: Path) -> dict:
    """The safetensors state dict of a checkpoint dir (as stored, e.g. bf16)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise CheckpointError("no *.safetensors files", where=str(path),
                              fix="Run scripts/train_toy.py to build the toy checkpoints")
    state: dict = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_model(*, path: Path, state: dict | None = None):
    """float32 `LlamaForCausalLM` from `path`'s config, with `state` (default: its own weights).

    In eval mode, but gradients stay enabled process-wide (generation uses `torch.no_grad` locally),
    so training in the same process after loading still learns."""
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(str(path))
    model = LlamaForCausalLM(cfg).float()
    state = load_state(path=path) if state is None else state
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    model.eval()
    return model


def greedy_generate(*, model, tokenizer, questions: Sequence[str], max_new_tokens: int = 200,
                    batch_size: int = 64) -> list[list[int]]:
    """Greedy continuation token ids (EOS and after stripped) for each question's chat prompt."""
    import torch

    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    # Sort by prompt length so batches carry little padding; restore order at the end.
    order = sorted(range(len(questions)), key=lambda i: len(questions[i].split()))
    results: dict[int, list[int]] = {}
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": questions[i]}],
                                                 add_generation_prompt=True, tokenize=False)
                   for i in idx]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        for row, i in zip(gen[:, enc["input_ids"].shape[1]:].tolist(), idx):
            results[i] = row[:row.index(eos)] if eos in row else row
    for i in range(len(questions)):
        out.append(results[i])
    return out


def greedy_lengths(*, alphas: Sequence[float], base_dir: Path = BASE_DIR,
                   reasoner_dir: Path = REASONER_DIR, test_path: Path = TEST_PATH,
                   limit: int | None = None, batch_size: int = 64) -> list[dict]:
    """Per α: accuracy and mean generated tokens of the merged toy model (greedy, transformers).

    Returns [{"alpha", "accuracy", "mean_tokens", "n"}]; generated tokens exclude EOS.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    rows = read_jsonl(path=test_path)[:limit]
    tv = TaskVector.between(base_dir, reasoner_dir)
    table = []
    for alpha in alphas:  # θ1 + αΔ through tvtool's one merge path (what materialize writes)
        model = load_model(path=base_dir, state=dict(tv.apply_to(base_dir, alpha=alpha)))
        gens = greedy_generate(model=model, tokenizer=tokenizer, questions=[r["question"] for r in rows],
                               batch_size=batch_size)
        correct = sum(parse_answer(text=tokenizer.decode(g)) == r["gold"] for g, r in zip(gens, rows))
        table.append({"alpha": alpha, "accuracy": correct / len(rows),
                      "mean_tokens": sum(map(len, gens)) / len(rows), "n": len(rows)})
    return table


def check_bar(*, table: Sequence[dict], min_accuracy: float = 0.85) -> list[str]:
    """Failures of the toy bar on an α table over 0, 0.1, ..., 1.0 (empty list = pass)."""
    fails = []
    lens = [r["mean_tokens"] for r in table]
    if any(b < a for a, b in zip(lens, lens[1:])):
        fails.append("mean length is not non-decreasing in α")
    if lens[-1] < 4 * lens[0]:
        fails.append(f"length ratio α=1/α=0 is {lens[-1] / lens[0]:.2f} < 4")
    inside = sum(1.1 * lens[0] < x < 0.9 * lens[-1] for x in lens[1:-1])
    if inside < 4:
        fails.append(f"only {inside} α values strictly between the endpoint lengths (need 4)")
    for r in table:
        if r["accuracy"] < min_accuracy:
            fails.append(f"accuracy {r['accuracy']:.3f} < {min_accuracy} at α={r['alpha']}")
    return fails
