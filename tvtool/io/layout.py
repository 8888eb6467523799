"""Names and layout: folder-name templates, file names, dtype names, tensor-name rules, Hub ids.

Every module that names a folder or a file, or recognises a tensor or a Hub id by its
name, takes the rule from here, so the rule changes in one place.
"""

from __future__ import annotations

import re

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id

# --- folders and files ---------------------------------------------------------------------

ALPHA_TEMPLATE = "alpha-{alpha}"  # default name of one α's folder (materialize, eval sweeps, adapters)
ALPHA_DIR = re.compile(r"^alpha[-_=]?(-?\d+(?:\.\d+)?(?:e-?\d+)?)$")  # α back from a folder name
INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # a PEFT adapter folder
SETTINGS_FILE = "tvtool.json"  # a materialized α folder's settings + provenance, written last
SAMPLES, SUMMARY, RUN = "samples.jsonl", "summary.json", "run.json"  # one evaluation run's files
PARTIAL = ".partial"  # suffix of an output being written (see tvtool.io.atomic)


def dataset_dir(name: str) -> str:
    """A dataset's folder inside an evaluation's run folder: 'org/set' → 'org-set', 'x.jsonl' → 'x'."""
    return name.replace("/", "-").replace("\\", "-").removesuffix(".jsonl").removesuffix(".xml")


def summary_table(name: str) -> str:
    """The file stem of a multi-run evaluation's table for dataset `name` (summary-<dataset>.md/.json/.png)."""
    return f"summary-{dataset_dir(name)}"


# --- dtypes --------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype choices


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 → 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


# --- α ---------------------------------------------------------------------------------------


def format_alpha(a: float) -> str:
    """0.6 → '0.6', 1.0 → '1', -0.5 → '-0.5'."""
    return f"{a:g}" if abs(a) < 1e16 else repr(a)


def alpha_name(alpha: float, template: str = ALPHA_TEMPLATE) -> str:
    """The folder (or run label) of one α: `template` with {alpha} filled by `format_alpha`."""
    return template.format(alpha=format_alpha(alpha))


# --- tensor names ----------------------------------------------------------------------------

LM_HEAD = "lm_head.weight"
FACTOR_A, FACTOR_B = ".lora_A", ".lora_B"  # factored Δ[X] ≈ X.lora_B [out, r] @ X.lora_A [r, in]
_VOCAB = re.compile(r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_out|embed_in)\.weight$")
_EMBED = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in)\.weight$")


def is_vocab_tensor(name: str) -> bool:
    """Rows indexed by token id (embeddings, lm_head): may differ in length between models."""
    return bool(_VOCAB.search(name))


def embed_name(names) -> str | None:
    """The input-embedding tensor among `names` (what a tied lm_head reuses)."""
    return next((n for n in names if _EMBED.search(n)), None)


# --- Hub ids -----------------------------------------------------------------------------------


def is_hub_id(text: str | None) -> bool:
    """`org/name` as the Hub accepts it (huggingface_hub's own rule); a bare name or a path is not."""
    if not text or text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def parse_hub_ref(ref: str) -> tuple[str, str | None] | None:
    """'org/name[@revision]' → (repo id, revision or None); None when `ref` is not one."""
    repo_id, at, revision = ref.partition("@")
    if not is_hub_id(repo_id) or (at and not revision):
        return None
    return repo_id, revision or None
