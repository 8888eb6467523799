"""Model cards for merged checkpoints: honest YAML metadata plus how to reproduce."""

from __future__ import annotations

import yaml
from huggingface_hub import ModelCard, ModelCardData

from . import __version__
from .layout import is_hub_id


def _hub_id(src: dict | None) -> str | None:
    """The Hub id of a source, if it came from the Hub (local paths are not valid `base_model`s)."""
    if not src:
        return None
    rid = src.get("repo_id") or src.get("source", "")
    return rid if is_hub_id(rid) else None


def mergekit_config(*, base: str, reasoner: str, alpha: float, out_dtype: str) -> str:
    """The mergekit config that reproduces θ1 + α·Δ (task_arithmetic, float32 math, one rounding)."""
    cfg = {"merge_method": "task_arithmetic", "base_model": base,
           "models": [{"model": reasoner, "parameters": {"weight": alpha}}],
           "dtype": "float32", "out_dtype": out_dtype}
    return yaml.safe_dump(cfg, sort_keys=False)


def model_card(*, alpha: float, base: dict, reasoner: dict | None, delta: dict | None, dtype: str,
               include: str | None, exclude: str | None, config_from: str, command: str,
               low_rank: dict | None = None) -> str:
    """README.md text for one materialized α folder."""
    parents = [p for p in (_hub_id(base), _hub_id(reasoner)) if p]
    data = ModelCardData(
        library_name="transformers",
        base_model=parents or None,
        base_model_relation="merge" if parents else None,
        tags=["tvtool", "merge", "task-arithmetic", "cot-valve"],
        tvtool={"version": __version__, "alpha": alpha, "base": base, "reasoner": reasoner,
                "delta": _brief(delta), "dtype": dtype, "include": include, "exclude": exclude,
                "config_from": config_from,
                **({"low_rank": {k: v for k, v in low_rank.items() if k != "report"}} if low_rank else {})},
    )
    b = base.get("source")
    r = (reasoner or {}).get("source", "REASONER")
    sel = ""
    if include or exclude:
        sel = (f"\nα is applied only to tensors matching `{include or '.*'}`"
               + (f" and not `{exclude}`" if exclude else "") + "; all other tensors are the base's.\n")
    rank = ""
    if low_rank:
        how = (f"rank-{low_rank['rank']}" if low_rank.get("rank") else
               f"energy-{low_rank.get('energy')} (max rank {low_rank.get('max_rank')})")
        rank = f"\nΔ was replaced by a {how} approximation ({low_rank.get('method')} SVD) before merging.\n"
    body = f"""
# θ₁ + {alpha}·Δ (tvtool merge)

This checkpoint is a task-vector merge made with [tvtool](https://pypi.org/project/tvtool/) {__version__}:

    θ = θ₁ + α·(θ₂ − θ₁),  α = {alpha}

- θ₁ (base): `{b}`{_rev(base)}
- θ₂ (reasoner): `{r}`{_rev(reasoner)}
- arithmetic in float32, rounded once to `{dtype}`
- config, tokenizer, chat template and generation config from the {config_from}
{sel}{rank}
In the CoT-Valve view, α moves the model along the direction from the base to the
reasoning model: 0 < α < 1 interpolates (shorter chains of thought), α > 1 extrapolates.
It is not fine-tuned further; evaluate it before relying on it.

## Reproduce

```bash
{command}
```

With mergekit (gives the same tensors; mergekit copies the tokenizer and
generation config from the base, tvtool takes them from the {config_from}):

```yaml
{mergekit_config(base=b, reasoner=r, alpha=alpha, out_dtype=dtype).strip()}
```
"""
    if include or exclude:
        body += "\nThe mergekit config above applies α to every tensor; it does not express the tensor selection.\n"
    if (delta or {}).get("skipped"):
        left = ", ".join(f"`{s['name']}` ({s['reason']})" for s in delta["skipped"])
        body += f"\nTensors left at the base: {left}\n"
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body))


def _rev(src: dict | None) -> str:
    return f" @ `{src['revision']}`" if src and src.get("revision") else ""


def _brief(delta: dict | None) -> dict | None:
    """The delta's provenance without bulky per-tensor reports."""
    if not delta:
        return delta
    return {k: ({kk: vv for kk, vv in v.items() if kk != "report"} if isinstance(v, dict) else v)
            for k, v in delta.items()}
