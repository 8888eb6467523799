"""Float8 checkpoints with block scales (DeepSeek-V3/R1, Qwen3 FP8): read as the float32 weights they stand for.

A tiny llama pair is quantized at test time the way those releases are (float8_e4m3fn linear weights,
`weight_scale_inv` float32 scales per [bn, bk] block, `quantization_config.weight_block_size` = [bn, bk]),
with a non-square block that does not divide the shapes, so that swapping rows and columns or dropping
the partial blocks would show. The reference dequantization is independent (float64 numpy).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tvtool
from helpers import assert_bit_equal, assert_one_line_error, cli
from tiny import state_dict
from tvtool import Checkpoint, DeltaOptions, DeltaSource, MaterializeOptions

BLOCK = [48, 32]  # [rows (out features), columns (in features)] per scale; 128 % 48 != 0
FIX = ("Dequantize the checkpoint to bfloat16 first (e.g. DeepSeek-V3's inference/fp8_cast_bf16.py), or use the "
       "model's bfloat16 release")


def _quantize(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale_inv) as DeepSeek's act/weight quantization lays them out: per block,
    scale = amax / 448, Wq = W / scale in float8_e4m3fn; scale_inv multiplies Wq back."""
    bn, bk = block
    rows, cols = w.shape
    s = torch.empty(math.ceil(rows / bn), math.ceil(cols / bk))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    x = w.float()
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = x[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
            s[i, j] = blk.abs().max().clamp(min=1e-12) / 448.0
            q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def fp8_copy(src: Path, dst: Path, *, block=BLOCK, config: dict | None = None, drop_scale: str | None = None) -> Path:
    """`src` with every 2-D *_proj weight in block-scaled fp8, as one model.safetensors, and config.json's
    quantization_config (or `config` over it)."""
    shutil.copytree(src, dst)
    sd = state_dict(dst)
    out = {}
    for n, t in sd.items():
        if n.endswith("_proj.weight"):
            q, s = _quantize(t, block)
            out[n], out[n + "_scale_inv"] = q, s
        else:
            out[n] = t
    if drop_scale:
        del out[drop_scale + "_scale_inv"]
    for f in list(dst.glob("*.safetensors")) + list(dst.glob("*.index.json")):
        f.unlink()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    cfg["quantization_config"].update(config or {})
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def reference(folder: Path) -> dict[str, torch.Tensor]:
    """Independent dequantization in float64 numpy, rounded once to float32: W = Wq · S[i // bn, j // bk]."""
    sd = load_file(folder / "model.safetensors")
    bn, bk = json.loads((folder / "config.json").read_text())["quantization_config"]["weight_block_size"]
    out = {}
    for n, t in sd.items():
        if n.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            q = t.float().double().numpy()
            s = sd[n + "_scale_inv"].double().numpy()
            rows, cols = q.shape
            s_full = np.repeat(np.repeat(s, bn, axis=0), bk, axis=1)[:rows, :cols]
            out[n] = torch.from_numpy(q * s_full).float()
        else:
            out[n] = t
    return out


def dequantized_folder(fp8: Path, dst: Path) -> Path:
    """The reference weights saved as a plain (float32 where fp8) checkpoint with the fp8 folder's other files."""
    shutil.copytree(fp8, dst)
    (dst / "model.safetensors").unlink()
    save_file(reference(fp8), dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _hashes(*folders: Path) -> dict[str, str]:
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for d in folders for f in sorted(d.rglob("*"))
            if f.is_file()}


@pytest.fixture(scope="module")
def fp8_pair(llama, tmp_path_factory):
    base, reasoner = llama
    root = tmp_path_factory.mktemp("fp8")
    b, r = fp8_copy(base, root / "base-fp8"), fp8_copy(reasoner, root / "reasoner-fp8")
    return b, r, dequantized_folder(b, root / "base-ref"), dequantized_folder(r, root / "reasoner-ref")


def test_block_scaled_fp8_reads_as_its_float32_weights(fp8_pair):
    b, _, _, _ = fp8_pair
    ck = Checkpoint.open(b)
    ref = reference(b)
    assert sorted(ck.names()) == sorted(ref)  # the scales are not tensors of the model
    q = "model.layers.0.self_attn.q_proj.weight"
    assert ck.info(q).dtype == torch.float32
    assert_bit_equal({n: ck.read(n) for n in ck.names()}, ref)
    assert torch.equal(ck.read(q, 40, 100), ref[q][40:100])  # row chunks that straddle the 48-row blocks
    assert "quantization_config" not in ck.config()
    assert "quantization_config" not in json.loads(ck.side_files()["config.json"])
    stored = dict(ck.iter_stored())  # what an engine started from the fp8 folder itself loads: the bytes as stored
    raw = load_file(b / "model.safetensors")
    assert_bit_equal(stored, raw)


def test_delta_and_materialize_of_an_fp8_pair_equal_the_dequantized_pair(fp8_pair, tmp_path):
    b, r, b_ref, r_ref = fp8_pair
    before = _hashes(b, r)
    out = tmp_path / "d.safetensors"
    res = cli("delta", b, r, "-o", out, "--no-progress")
    assert res.exit_code == 0, res.stderr
    ref = tvtool.delta(base=b_ref, reasoner=r_ref, output=tmp_path / "ref.safetensors",
                       options=DeltaOptions(progress=False)).output
    d, d_ref = load_file(out), load_file(ref)
    assert_bit_equal(d, d_ref)
    assert d["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32  # Δ in float32
    assert not any(n.endswith("_scale_inv") for n in d)
    res = cli("materialize", b, "--reasoner", r, "-a", "0.5", "-a", "1", "-o", tmp_path / "m", "--no-progress")
    assert res.exit_code == 0, res.stderr
    m_ref = tvtool.materialize(source=DeltaSource(base=str(b_ref), reasoner=str(r_ref)), output=tmp_path / "m-ref",
                               options=MaterializeOptions(alphas=(0.5, 1.0), progress=False))
    for a in ("alpha-0.5", "alpha-1"):
        got = state_dict(tmp_path / "m" / a)
        assert_bit_equal(got, state_dict(m_ref.folders[float(a.split("-")[1])]))
        assert not any(t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for t in got.values())  # no fp8 output
        cfg = json.loads((tmp_path / "m" / a / "config.json").read_text())
        assert "quantization_config" not in cfg  # the output is not fp8: no loader may read it as fp8
    assert_bit_equal(state_dict(tmp_path / "m" / "alpha-1"), reference(r))  # α=1: the fp8 reasoner's weights
    assert _hashes(b, r) == before


def test_a_bf16_base_and_an_fp8_reasoner(llama, fp8_pair, tmp_path):
    base, _ = llama
    _, r, _, r_ref = fp8_pair
    res = cli("delta", base, r, "-o", tmp_path / "d.safetensors", "--no-progress")
    assert res.exit_code == 0, res.stderr
    ref = tvtool.delta(base=base, reasoner=r_ref, output=tmp_path / "ref.safetensors",
                       options=DeltaOptions(progress=False)).output
    assert_bit_equal(load_file(tmp_path / "d.safetensors"), load_file(ref))


UP = "model.layers.0.mlp.down_proj.weight"


@pytest.mark.parametrize("case", ["no-quantization-config", "per-tensor-format", "missing-scale", "fmt-e5m2"])
def test_fp8_that_cannot_be_dequantized_is_refused_naming_tensor_and_dtype(llama, tmp_path, case):
    base, reasoner = llama
    why = {
        "no-quantization-config": "config.json declares no block-scaled fp8 format tvtool reads (quantization_config "
                                  "with quant_method fp8, fmt e4m3, dynamic activations, weight_block_size [bn, bk])",
        "per-tensor-format": "config.json declares no block-scaled fp8 format tvtool reads (quantization_config "
                             "with quant_method fp8, fmt e4m3, dynamic activations, weight_block_size [bn, bk])",
        "missing-scale": f"it has no block scales ({UP}_scale_inv) beside it",
        "fmt-e5m2": "config.json declares no block-scaled fp8 format tvtool reads (quantization_config with "
                    "quant_method fp8, fmt e4m3, dynamic activations, weight_block_size [bn, bk])",
    }[case]
    r = fp8_copy(reasoner, tmp_path / "r", drop_scale=UP if case == "missing-scale" else None,
                 config={"weight_block_size": None} if case == "per-tensor-format" else
                 {"fmt": "e5m2"} if case == "fmt-e5m2" else None)
    if case == "no-quantization-config":
        cfg = json.loads((r / "config.json").read_text())
        del cfg["quantization_config"]
        (r / "config.json").write_text(json.dumps(cfg))
    projections = [n for n in Checkpoint.open(base).names() if n.endswith("_proj.weight")]
    first = UP if case == "missing-scale" else projections[0]
    before = _hashes(r)
    for args in (["delta", base, r, "-o", tmp_path / "d.safetensors"],
                 ["materialize", base, "--reasoner", r, "-a", "0.5", "-o", tmp_path / "m"]):
        res = cli(*args, "--no-progress")
        assert_one_line_error(res, f"tensor {first!r} is float8_e4m3fn and cannot be read as real weights: {why} "
                                   f"({r / 'model.safetensors'}). {FIX}")
        assert res.exit_code == 2
    assert not (tmp_path / "d.safetensors").exists() and not (tmp_path / "m" / "alpha-0.5").exists()
    assert not list(tmp_path.glob("*.partial")) and not list((tmp_path / "m").glob("*.partial"))
    assert _hashes(r) == before
