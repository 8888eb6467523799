"""The trained adapter's README.md (model card) and loss-curve PNG."""

from __future__ import annotations

import re
from pathlib import Path

from tvtool._version import __version__

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PAPER = "CoT-Valve (Ma et al., 2025, arXiv:2502.09601)"
_WHAT = {
    "valve": "CoT-Valve (§3.1, eq. 2): a LoRA Δθ fine-tuned on one solution column; θ + α·Δθ interpolates "
             "(0 < α < 1) or extrapolates (α > 1) the chain length.",
    "valve++": "CoT-Valve++ (§3.3, eq. 3–4): each MixChain solution trained at θ + β·Δθ′ with its own β "
               "(1 = the question's shortest solution, 0 = its longest), so α ∈ [0, 1] at inference walks "
               "from long to short chains.",
    "progressive": "CoT-Valve+P (§3.3): one LoRA trained through the MixChain columns from the longest to the "
                   "shortest (solution_K … solution_1, then solution_0); each stage's adapter is in stages/.",
}


def write_plot(*, losses: list[dict], path: str | Path) -> Path | None:
    """Loss per optimizer step; stage boundaries marked (progressive). None without matplotlib."""
    try:
        import matplotlib
    except ImportError:  # the eval extra is not installed: the losses stay in train.json
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([x["step"] for x in losses], [x["loss"] for x in losses], lw=1)
    for i, x in enumerate(losses):
        if i == 0 or x["stage"] != losses[i - 1]["stage"]:
            ax.axvline(x["step"] - 0.5, color="grey", lw=0.6, ls="--")
            ax.text(x["step"], ax.get_ylim()[1], f" {x['stage']}", va="top", fontsize=7, color="grey")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean token NLL)")
    ax.set_title("tvtool train")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_card(*, record: dict) -> str:
    """README.md: YAML metadata (library_name peft, base_model, tags) and how the adapter was trained."""
    from huggingface_hub import ModelCard, ModelCardData

    model, mode, o = record["model"]["path"], record["mode"], record["options"]
    data = ModelCardData(library_name="peft", base_model=model if _HUB_ID.match(model) else None,
                         tags=["tvtool", "lora", "peft", "cot-valve", mode],
                         tvtool={"version": __version__, "mode": mode, "final_loss": record["final_loss"]})
    stages = "\n".join(f"| {s['name']} | {s['samples']} | {s['skipped_long']} | {s['skipped_zero_beta']} | "
                       f"{s['steps']} |" for s in record["stages"])
    hp = "\n".join(f"| {k} | {v} |" for k, v in o.items())
    d = record["data"]
    loss = "–" if record["final_loss"] is None else f"{record['final_loss']:.4f}"
    body = f"""
# CoT-Valve LoRA ({mode}), trained with tvtool

{_WHAT[mode]} Method: {PAPER}.

- base model: `{model}`
- data: `{d['path']}` ({d['layout']} layout, {d['rows']} rows, columns {', '.join(d['columns'])}; sha256 `{d['sha256'][:16]}…`)
- prompt: as `tvtool eval` builds it (chat template: {record['prompt']['chat_template']}, instruction
  `{record['prompt']['instruction']}`, system prompt `{record['prompt']['system_prompt']}`); the loss covers only
  the solution tokens and EOS
- final loss (mean token NLL of the last step): **{loss}**, after {record['steps']} steps
- loss curve: `loss.png`

| stage | samples | skipped (too long) | skipped (β = 0) | steps |
|---|---|---|---|---|
{stages}

## Hyper-parameters

| option | value |
|---|---|
{hp}

## Use

A LoRA adapter is a task vector Δθ = (lora_alpha/r)·B·A: scale it by α.

```bash
tvtool eval --model {model} --lora <this folder>                         # α = 1, served as LoRA
tvtool eval --base {model} --delta <this folder> --alpha 0,0.25,0.5,0.75,1  # one engine, α in place
tvtool materialize {model} --delta <this folder> --alpha 0.5 -o merged/
```

Made with tvtool {__version__}; settings and per-step losses in `train.json`.
"""
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body))


__all__ = ["write_card", "write_plot"]
