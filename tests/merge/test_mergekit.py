"""tvtool's merge equals mergekit's task_arithmetic, run for real from the config in the model card."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import tvtool
from tvtool.vectors.source import DeltaSource
from helpers import assert_bit_equal
from tiny import state_dict


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_card_config_reproduces_the_folder_with_mergekit(pairs, tmp_path, arch):
    base, reasoner = pairs[arch]
    res = tvtool.materialize(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path / "tv",
                             options=tvtool.MaterializeOptions(alphas=(0.6,), progress=False))
    card = (res.folders[0.6] / "README.md").read_text()
    config = re.search(r"```yaml\n(.*?)```", card, re.S).group(1)
    assert "merge_method: task_arithmetic" in config and "dtype: float32" in config
    (tmp_path / "mk.yml").write_text(config)
    mergekit = Path(sys.executable).with_name("mergekit-yaml")
    p = subprocess.run([str(mergekit), str(tmp_path / "mk.yml"), str(tmp_path / "mk"), "--quiet"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    ours, theirs = state_dict(res.folders[0.6]), state_dict(tmp_path / "mk")
    assert set(ours) == set(theirs)
    assert_bit_equal(ours, theirs)
