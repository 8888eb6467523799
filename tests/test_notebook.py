"""The walk-through notebook runs top to bottom on the toy pair (every cell must succeed)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.py"


@pytest.mark.vllm
@pytest.mark.slow
def test_walkthrough_notebook_executes(tmp_path):
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(NOTEBOOK)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "tensors in Δ" in outputs and "α=0.2" in outputs and "--- α = 1" in outputs
