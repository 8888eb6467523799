"""Print `tvtool sweep RECIPE --plan` for the GPU recipes on a machine without their models: each Hub id the
recipe names is given a throwaway Hugging Face cache holding only a config.json, the public config of a model
with the same shapes (tests/fixtures/configs), so the plan reads config.json alone and downloads nothing.

    python scripts/plan_recipes.py [--gpu-memory 80GiB] [RECIPE ...]

What each recipe's comment block "Plan" shows comes from here (the stand-in configs are named in it)."""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "fixtures" / "configs"
# Hub id → a public config.json with the same parameter shapes (vocabulary included)
STAND_INS = {
    "meta-llama/Llama-3.1-8B": "llama-3.1-8b.json",
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": "llama-3.1-8b.json",  # fine-tuned from Llama-3.1-8B
    "Qwen/Qwen2.5-32B-Instruct": "qwq-32b-preview.json",  # QwQ-32B-Preview is fine-tuned from it
    "Qwen/QwQ-32B-Preview": "qwq-32b-preview.json",
    "Qwen/Qwen2.5-32B": "qwq-32b-preview.json",  # the Qwen2.5-32B architecture
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": "qwq-32b-preview.json",  # distilled from Qwen2.5-32B
}
RECIPES = {"r1-distill-llama-8b.yaml": "24GB", "qwq-32b-preview.yaml": "80GB", "long-to-short-32b.yaml": "80GB"}


def cache(root: Path) -> Path:
    """A Hugging Face hub cache (the real layout: snapshots/<sha>/config.json → ../../blobs/<hash>)."""
    for repo, name in STAND_INS.items():
        data = (CONFIGS / name).read_bytes()
        d = root / ("models--" + repo.replace("/", "--"))
        blob, sha = hashlib.sha256(data).hexdigest(), hashlib.sha1(repo.encode()).hexdigest()
        (d / "blobs").mkdir(parents=True)
        (d / "blobs" / blob).write_bytes(data)
        (d / "snapshots" / sha).mkdir(parents=True)
        (d / "snapshots" / sha / "config.json").symlink_to(f"../../blobs/{blob}")
        (d / "refs").mkdir()
        (d / "refs" / "main").write_text(sha)
    return root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipes", nargs="*", default=list(RECIPES))
    ap.add_argument("--gpu-memory", help="per GPU (default: the recipe's GPU)")
    ap.add_argument("--gpus", default="1", help="training processes")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tvtool-plan-cache-") as tmp:
        env = {**os.environ, "HF_HUB_CACHE": str(cache(Path(tmp))), "HF_HUB_OFFLINE": "1"}
        for r in a.recipes:
            name = Path(r).name
            mem = a.gpu_memory or RECIPES.get(name, "80GB")
            text = (ROOT / "recipes" / name).read_text()
            used = ", ".join(f"{k} ← tests/fixtures/configs/{v}" for k, v in STAND_INS.items() if k in text)
            print(f"tvtool sweep recipes/{name} --plan --gpu-memory {mem} --gpus {a.gpus}; config.json only, "
                  f"stand-ins: {used}")
            res = subprocess.run([sys.executable, "-m", "tvtool", "sweep", f"recipes/{name}", "--plan",
                                  "--gpu-memory", mem, "--gpus", a.gpus], env=env, cwd=ROOT, capture_output=True,
                                 text=True, check=False)
            print((res.stdout + res.stderr).replace(tmp, "$HF_HUB_CACHE"), flush=True)


if __name__ == "__main__":
    main()
