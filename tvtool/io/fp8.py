"""Float8 checkpoints: read as the float32 weights they stand for, or refused in one line.

FP8 releases of reasoning models (DeepSeek-V3/R1, Qwen3 "-FP8") store each quantized linear weight
`X.weight` as float8_e4m3fn [out, in] with a float32 block-scale tensor `X.weight_scale_inv` beside it,
[ceil(out/bn), ceil(in/bk)], and config.json's `quantization_config` says so:
{"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [bn, bk]}.
The weight the model computes with is

    W[i, j] = fp32(Wq[i, j]) · S[i // bn, j // bk]        (one float32 product per element)

— DeepSeek-V3's `weight_dequant` (inference/kernel.py; its fp8_cast_bf16.py then rounds W to bf16), with
bn along the rows (output features) and bk along the columns, as vLLM's block-fp8 layers read
`weight_block_size = [block_n, block_k]` (scale shape (ceil(N/block_n), ceil(K/block_k))).

A checkpoint in that format is seen through `BlockScaled`: `X.weight` reads as float32 W (exact: the fp8
value and the scale are float32 numbers, their product is rounded once), `X.weight_scale_inv` is not a
tensor of the model, and config.json comes without `quantization_config` (the weights are no longer fp8).
So Δ and every merge are computed in float32 from the weights the fp8 model uses, and an output never
holds fp8 bytes that lost their scales. Any other float8 tensor (another format, a missing or misshaped
scale, per-tensor scales, pickles) is refused when read, naming the tensor, its dtype and the fix: its
bytes are never taken for another dtype.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from tvtool.errors import CheckpointError
from tvtool.io.buffers import empty

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
SCALE_SUFFIX = "_scale_inv"  # X.weight → X.weight_scale_inv
FIX = ("dequantize the checkpoint to bfloat16 first (e.g. DeepSeek-V3's inference/fp8_cast_bf16.py), or use the "
       "model's bfloat16 release")


@dataclass(frozen=True)
class BlockScaled:
    """One fp8 weight with its block scales: W = fp32(Wq) · S. The `TensorInfo`s (tvtool.io.safetensors_io, not
    imported: this module sits below it) say where each is stored."""

    weight: Any  # TensorInfo: float8_e4m3fn [out, in], as stored
    scale: Any  # TensorInfo: [ceil(out / bn), ceil(in / bk)]
    block: tuple[int, int]  # (bn, bk): rows, columns per scale

    def scale_rows(self, start: int, stop: int) -> tuple[int, int]:
        """The rows [first, last) of the scales that weight rows [start, stop) use."""
        return start // self.block[0], max(start // self.block[0], (stop - 1) // self.block[0] + 1)

    def dequantize(self, q: torch.Tensor, s: torch.Tensor, start: int) -> torch.Tensor:
        """float32 W for fp8 weight rows `q` [rows, in] starting at row `start`, given their scale rows `s`
        (`scale_rows`): one float32 product per element, so W is exact up to that one rounding."""
        bn, bk = self.block
        w = empty(tuple(q.shape), torch.float32).copy_(q)  # exact: every fp8 value is a float32
        if w.numel() == 0:
            return w
        first = start // bn
        per_row = s.float().repeat_interleave(bn, dim=0)[start - first * bn: start - first * bn + w.shape[0]]
        for j in range(per_row.shape[1]):  # [rows, bk] · [rows, 1]
            w[:, j * bk:(j + 1) * bk].mul_(per_row[:, j:j + 1])
        return w


def fp8_config(config: dict) -> tuple[int, int] | None:
    """(bn, bk) when config.json declares the block-scaled fp8 format read here, else None."""
    q = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(q, dict) or q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        return None
    if q.get("activation_scheme", "dynamic") != "dynamic":  # static input scales: not a weight format alone
        return None
    block = q.get("weight_block_size")
    if (not isinstance(block, list) or len(block) != 2
            or not all(type(b) is int and b > 0 for b in block)):
        return None
    return block[0], block[1]


def dequantized_view(infos: dict[str, Any], config: dict, *, pickled: bool = False
                     ) -> tuple[dict[str, Any], dict[str, BlockScaled], dict[str, str]]:
    """The checkpoint as seen through its scales: ({name: TensorInfo}, {name: BlockScaled}, {name: why refused}).

    Block-scaled weights appear as float32 tensors; other fp8 tensors stay as stored, with the reason they
    cannot be read; the scale tensors beside either disappear (reading the weight is what fails, in one line)."""
    if not any(i.dtype in FP8 for i in infos.values()):
        return infos, {}, {}
    block = None if pickled else fp8_config(config)
    view, scaled, refused = dict(infos), {}, {}
    for name, info in infos.items():
        if info.dtype not in FP8:
            continue
        scale = infos.get(name + SCALE_SUFFIX)
        if block is None:
            refused[name] = ("config.json declares no block-scaled fp8 format tvtool reads (quantization_config "
                             "with quant_method fp8, fmt e4m3, dynamic activations, weight_block_size [bn, bk])")
        elif info.dtype != torch.float8_e4m3fn:
            refused[name] = "the fp8 format in config.json is e4m3, but this tensor is not"
        elif len(info.shape) != 2:
            refused[name] = f"block scales apply to 2-D weights, this tensor has shape {list(info.shape)}"
        elif scale is None:
            refused[name] = f"it has no block scales ({name + SCALE_SUFFIX}) beside it"
        else:
            want = [math.ceil(info.shape[0] / block[0]), math.ceil(info.shape[1] / block[1])]
            if list(scale.shape) != want or not scale.dtype.is_floating_point or scale.dtype in FP8:
                refused[name] = (f"its block scales {name + SCALE_SUFFIX} are {_dtype(scale.dtype)} "
                                 f"{list(scale.shape)}, not float {want} for weight_block_size {list(block)}")
            else:
                scaled[name] = BlockScaled(info, scale, block)
                view[name] = dataclasses.replace(info, dtype=torch.float32)
        if scale is not None and (name in scaled or name in refused):
            del view[name + SCALE_SUFFIX]  # a scale is not a tensor of the model (refused: the weight says why)
    return view, scaled, refused


def refused_error(name: str, info: Any, why: str) -> CheckpointError:
    """The one-line error for reading an fp8 tensor that cannot be dequantized."""
    return CheckpointError(f"tensor {name!r} is {_dtype(info.dtype)} and cannot be read as real weights: {why}",
                           where=str(info.file), fix=FIX)


def unquantized_config(config_json: bytes) -> bytes:
    """config.json of the dequantized view: the same, without `quantization_config`."""
    cfg = json.loads(config_json)
    cfg.pop("quantization_config", None)
    return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
