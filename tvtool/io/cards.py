"""Cards: model cards for merged checkpoints (honest YAML metadata plus how to reproduce), and the
MixChain dataset card."""

from __future__ import annotations

import yaml
from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData

from tvtool._version import __version__
from tvtool.io.layout import is_hub_id

MIXCHAIN_RECORD = "mixchain.json"  # the MixChain dataset folder's settings (tvtool.valve.mixchain.RECORD)


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


def dataset_card(*, stats: dict, record: dict, license: str, source_datasets: list[str] | None) -> str:
    """README.md: YAML metadata (license, tags) and the Table 9 statistics.

    No `configs:` block: `datasets` (5.2) caches a local folder whose card lists data_files by the
    folder name only, so a rebuilt folder would load stale rows; the file name
    data/train-00000-of-00001.parquet is found by its default patterns instead."""
    n = stats["kept"]
    size = "n<1K" if n < 1000 else "1K<n<10K" if n < 10_000 else "10K<n<100K" if n < 100_000 else "n>100K"
    data = DatasetCardData(
        license=license, language=["en"], task_categories=["text-generation"], size_categories=[size],
        source_datasets=source_datasets, pretty_name=f"MixChain-Z {record['dataset']['name']}",
        tags=["tvtool", "mixchain", "cot-valve", "math", "reasoning", "synthetic"],
        tvtool={"version": __version__, "mixchain": {k: record[k] for k in ("alphas", "min_correct", "keep_truncated",
                                                                               "models", "merge") if k in record}})
    k, ds, s = len(record["alphas"]), record["dataset"], record["sampling"]
    t9 = "\n".join(f"| {r['label']} | {r['samples']} | {_f(r['mean_tokens'])} |" for r in stats["table9"])
    pa = "\n".join(f"| {a['alpha']:g} | {a['generated']} | {a['correct']} | {_f(a['accuracy'])} | {a['truncated']} | "
                   f"{_f(a['mean_tokens_generated'])} | {a['kept']} |" for a in stats["per_alpha"])
    m = record["models"]
    hist = ", ".join(f"{j}: {c}" for j, c in stats["correct_histogram"].items())
    delta_line = f"- Δ: `{m['delta']}`\n" if m.get("delta") else f"- θ₂ (reasoner): `{m['reasoner']}`\n"
    if record.get("merge"):  # an operator's M in place of Δ (tvtool.merge.options.operator_settings)
        op = record["merge"]
        params = ", ".join(f"{k} {v}" for k, v in op.items() if k not in ("method", "more"))
        delta_line += (f"- merge operator: `{op['method']}` ({params or 'default settings'}) over "
                       f"{1 + len(op.get('more', []))} task vector(s) (θ₂{''.join(f', `{v}`' for v in op.get('more', []))})"
                       f"; each chain comes from θ₁ + α·M, M the operator's merge, in place of Δ\n")
    decoding = "greedy" if s["temperature"] == 0 else f"temperature {s['temperature']}, top_p {s['top_p']}"
    body = f"""
# MixChain-Z: {ds['name']} ({ds['split']}), made with tvtool

Reasoning chains of several lengths per question, built as in CoT-Valve (Ma et al., 2025,
arXiv:2502.09601, §3.2 and §4.2, "MixChain from zero-shot"): each question gets its ground-truth
solution (`solution_0`) and one chain from each merged model θ₁ + α·(θ₂ − θ₁), α ∈ {record['alphas']}
(`solution_1` … `solution_{k}`, α ascending, so chains tend to grow with the index). Solutions with a
wrong answer are removed.

## Models and generation
- θ₁ (base): `{m['base']}`
{delta_line}- α values: {', '.join(f'{a:g}' for a in record['alphas'])} (one vLLM engine, weights θ₁ + α·Δ loaded
  in place)
- decoding: {decoding}, max_tokens {s['max_tokens']}, one sample per question and α; vLLM {record['vllm_version']}
- prompt: {'the chat template of the reasoner' if record['prompt']['chat_template'] else 'plain format'}, \
instruction `{record['prompt']['instruction']}`, system prompt `{record['prompt']['system_prompt']}`
- questions: {ds['description']}{', shuffled with seed ' + str(ds['seed']) if ds.get('seed') is not None else ''}

## Filter
A generated solution is kept when its answer is correct (judged by {record.get('scorer', 'tvtool.evaluation.scoring')})
and it finished within max_tokens{' (here truncated chains are kept when correct)' if record['keep_truncated'] else ''}.
A question is kept when at least {stats['min_correct']} of its {k} generated solutions are kept, and it has
at least one solution. Kept: **{stats['kept']} of {stats['questions']}** questions; dropped:
{stats['dropped']['too few correct']} with too few kept solutions, {stats['dropped']['no solution']} with no solution
at all.
Questions by number of kept generated solutions: {hist}.

| α | generated | correct | accuracy % | truncated | mean #tokens (all) | kept |
|---|---|---|---|---|---|---|
{pa}

## Statistics (as the paper's Table 9)
| Solution index | #Samples | #Avg Token |
|---|---|---|
{t9}

## Columns
- `question`; `answer` (the ground-truth solution; GSM8K: calculator annotations and the `#### N` line
  removed); `target` (the gold final answer); `id` (tvtool's question id).
- `solution_0` = `answer`; `solution_k` (k ≥ 1) = the chain generated with α = `alpha_k`.
- `solution_k_token`: token length, counted one way for every solution as the paper counts generated
  tokens: the token ids a model emits for it, the final EOS included (generated chains: their generated
  token ids; `solution_0`: its ids under the reasoner's tokenizer, no special tokens, plus the EOS).
- `correct_k`: the chain reached the gold answer (and finished). A removed chain has `solution_k`,
  `solution_k_token` and `beta_k` = null and `correct_k` = false; `alpha_k` is always set.
- `beta_k` (CoT-Valve eq. 4) over the question's present solutions, `solution_0` included:
  β = 1 − (m − m_min)/(m_max − m_min); the shortest gets 1, the longest 0; with one solution, or all
  of one length, every β is 1 (each is a shortest solution).

The released MixChain-Z datasets have the same `question`, `answer`, `target`, `solution_k`,
`solution_k_token` and `correct_k` columns; `solution_0_token`, `alpha_k`, `beta_k` and `id` are added.

## License and provenance
Questions and ground-truth solutions: {ds['description']}; card license `{license}`
(for GSM8K and MATH-500: MIT, as the source data).
The generated chains are model outputs of the checkpoints above; their use may also be subject to
those models' licenses. Made with tvtool {__version__}; settings in `{MIXCHAIN_RECORD}`.
"""
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"
