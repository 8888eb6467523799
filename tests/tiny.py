"""Tiny checkpoints of real architectures, built at test time with transformers.

`make_pair` writes a base and a "reasoner" that differs from it like a fine-tune
(a low-rank, decaying-spectrum update plus small noise), saved in bf16 and sharded
differently (base in more shards than the reasoner), with a word-level tokenizer,
chat template and generation config (the reasoner's differ from the base's, so
tests can tell whose files an output carries). head_dim is 64 so vLLM CPU runs them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

VOCAB = 256
WORDS = ["<unk>", "<s>", "</s>", "<pad>"] + [str(i) for i in range(100)] + \
    "the a is of and to in what how many apples has gives more less so answer boxed { } + - = . ? , " \
    "tom ann bob cat dog eats buys sells has had now then step one two three think check".split()


def tokenizer(chat_template: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(WORDS))
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words[:VOCAB])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", chat_template=chat_template)


def config(arch: str):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "tied":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    raise ValueError(arch)


def finetune_like(sd: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """θ2 = θ1 + a decaying-spectrum low-rank update (+ small noise), as after fine-tuning."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in sd.items():
        x = t.float()
        if x.dim() == 2:
            r = min(8, *x.shape)
            u = torch.randn(x.shape[0], r, generator=g)
            v = torch.randn(r, x.shape[1], generator=g)
            s = torch.tensor([0.5 ** k for k in range(r)])
            upd = (u * s) @ v / (x.shape[1] ** 0.5)
            x = x + scale * x.std() * (upd + 0.1 * torch.randn(x.shape, generator=g))
        else:
            x = x + scale * (x.abs().mean() + 1e-3) * torch.randn(x.shape, generator=g)
        out[name] = x.to(t.dtype)
    return out


def save(model, tok, path: Path, *, shard: str, generation: dict, dtype=torch.bfloat16) -> Path:
    from transformers import GenerationConfig

    model = model.to(dtype)
    model.save_pretrained(path, max_shard_size=shard)
    tok.save_pretrained(path)
    GenerationConfig(**generation).save_pretrained(path)
    return path


def make_pair(root: Path, arch: str, *, seed: int = 0) -> tuple[Path, Path]:
    """(base, reasoner) folders under `root`/arch; sharded differently; reasoner files differ."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = config(arch)
    model = AutoModelForCausalLM.from_config(cfg)
    model.to(torch.bfloat16)
    base = save(model, tokenizer("{% for m in messages %}{{ m['content'] }} {% endfor %}"), root / arch / "base",
                shard="100KB", generation={"bos_token_id": 1, "eos_token_id": 2, "max_new_tokens": 20})
    sd = finetune_like(model.state_dict(), seed + 1)
    model.load_state_dict(sd, strict=True)
    reasoner = save(model, tokenizer("{% for m in messages %}think {{ m['content'] }} {% endfor %}step"),
                    root / arch / "reasoner", shard="300KB",
                    generation={"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.6, "do_sample": True})
    return base, reasoner


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder (any sharding), for reference computations on tiny models."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def index_files(path: Path) -> set[str]:
    idx = Path(path) / "model.safetensors.index.json"
    return set(json.loads(idx.read_text())["weight_map"].values()) if idx.exists() else {"model.safetensors"}


def edited_copy(src: Path, dst: Path, fn) -> Path:
    """Copy a checkpoint folder and rewrite its tensors with fn(state_dict), as one model.safetensors."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    sd = fn(state_dict(dst))
    for f in list(dst.glob("*.safetensors")) + list(dst.glob("*.index.json")):
        f.unlink()
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst
