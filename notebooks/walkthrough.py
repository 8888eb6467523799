# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # tvtool walk-through on the toy reasoning pair
#
# The bundled pair: θ1 (base) answers arithmetic word problems tersely, θ2 (reasoner, fine-tuned
# from θ1) reasons at length. Δ = θ2 − θ1 is the task vector; θ1 + αΔ moves chain length with α.
# This notebook uses the Python API only (the CLI calls the same functions). Open it in Jupyter
# with jupytext, or run it as a script.

# %%
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import tvtool  # noqa: E402
from tvtool import TaskVector  # noqa: E402
from tvtool.toy import BASE_DIR, REASONER_DIR  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
work = Path(tempfile.mkdtemp(prefix="tvtool-notebook-"))

# %% [markdown]
# ## 1. Load the pair and compute Δ
# `TaskVector.between` is lazy: it matches tensors by name and reads nothing until asked.

# %%
tv = TaskVector.between(BASE_DIR, REASONER_DIR)
print(len(tv.names()), "tensors in Δ")
norms = {n: tv.get(n).norm().item() for n in tv.names()}
for n, v in sorted(norms.items(), key=lambda kv: -kv[1])[:5]:
    print(f"{n:50s} ‖Δ‖ = {v:.3f}")
delta = tvtool.delta(base=BASE_DIR, reasoner=REASONER_DIR, output=work / "delta.safetensors",
                     options=tvtool.DeltaOptions(dtype="float32", progress=False))
print(delta.summary())

# %% [markdown]
# ## 2. The spectrum of Δ and the energy kept at rank r

# %%
name = next(n for n in tv.names() if "mlp.down_proj" in n)
s = torch.linalg.svdvals(tv.get(name))
energy = (s**2).cumsum(0) / (s**2).sum()
fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
a1.semilogy(s.numpy(), ".-")
a1.set_title(f"singular values of Δ[{name}]")
a2.plot(range(1, len(energy) + 1), energy.numpy(), ".-")
a2.set_xlabel("rank r")
a2.set_title("retained energy ΣS²[:r]/ΣS²")
fig.tight_layout()
plt.show()
for r in (2, 8, 32):
    print(f"rank {r:3d}: {energy[r - 1].item():.3f} of ‖Δ‖²")
lowrank = tvtool.svd_rank(source=tvtool.DeltaSource(delta=delta.output), output=work / "delta-r8.safetensors",
                          options=tvtool.LowRankOptions(rank=8, progress=False))
print(lowrank.totals["energy_kept"], "of ‖Δ‖² kept by the rank-8 factored delta")

# %% [markdown]
# ## 3. Materialize two α in one pass

# %%
merged = tvtool.materialize(source=tvtool.DeltaSource(base=BASE_DIR, delta=delta.output), output=work / "merged",
                            options=tvtool.MaterializeOptions(alphas=(0.2, 1.0), progress=False))
print(merged.summary())

# %% [markdown]
# ## 4. Generate with vLLM: one engine, α swapped in place
# `evaluate` starts one engine and streams θ1 + αΔ into it for every α (no checkpoint written).

# %%
from tvtool.engine.options import EngineOptions, SamplingOptions  # noqa: E402
from tvtool.evaluation.evaluate import evaluate  # noqa: E402
from tvtool.engine.prompting import PromptOptions  # noqa: E402
from tvtool.evaluation.runs import EvalOptions  # noqa: E402

alphas = (0.0, 0.2, 0.4, 0.6, 1.0)
result = evaluate(output=work / "eval", source=tvtool.DeltaSource(base=BASE_DIR, delta=delta.output), alphas=alphas,
                  options=EvalOptions(dataset="toy", limit=40, progress=False),
                  prompt=PromptOptions(instruction=""), sampling=SamplingOptions(max_tokens=200),
                  engine_options=EngineOptions(dtype="float32", max_model_len=256, enforce_eager=True))
print(result.summary())

# %% [markdown]
# ## 5. Chain length vs α

# %%
rows = [(r.alpha, r.summary["mean_tokens"], r.summary["accuracy"]) for r in result.runs]
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot([a for a, _, _ in rows], [t for _, t, _ in rows], "o-")
ax.set_xlabel("α")
ax.set_ylabel("mean #tokens")
ax.set_title("θ1 + αΔ: chain length vs α")
plt.show()
assert rows[-1][1] > 2 * rows[0][1], "the reasoner should write longer chains than the base"

# %% [markdown]
# ## 6. Two answers side by side

# %%
import json  # noqa: E402

first = {a: json.loads((r.folder / "samples.jsonl").read_text().splitlines()[0]) for a, r in
         zip(alphas, result.runs)}
print("Q:", first[0.0]["prompt"])
for a in (0.0, 1.0):
    print(f"\n--- α = {a:g} ({first[a]['num_tokens']} tokens, correct={first[a]['correct']}) ---")
    print(first[a]["response"])
