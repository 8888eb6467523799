"""The engine's side of the resident swap, without starting vLLM: a stand-in `LLM` answers the workers'
RPCs. Where the copies go and the one-line refusals and notices; the vLLM API/version check at engine
start; one public α load (held, streaming, resident) and its record."""

from __future__ import annotations

import pytest

from helpers import assert_one_line_error, cli
from tvtool.engine.engine import Engine, load_record
from tvtool.engine.options import EngineOptions
from tvtool.errors import EngineError, OptionsError
from tvtool.merge.config import MergeConfig
from tvtool.vectors.source import DeltaSource

G = 1 << 30


class FakeLLM:
    """Answers collective_rpc like one CPU worker would; records the calls."""

    def __init__(self, *, need=G, free_cpu=8 * G, free_gpu=None, version="0.32.0", missing=()):
        self.calls, self.need, self.free_cpu, self.free_gpu = [], need, free_cpu, free_gpu
        self.version, self.missing = version, list(missing)

    def collective_rpc(self, method, kwargs=None):
        self.calls.append((method, dict(kwargs or {})))
        if method == "tvtool_check":
            return [{"vllm": self.version, "missing": self.missing}]
        if method == "tvtool_resident_need":
            return [{"need": self.need, "held": 0, "free_gpu": self.free_gpu, "free_cpu": self.free_cpu,
                     "host": "h", "notice": None}]
        if method == "tvtool_load_alpha":
            p = kwargs["placement"]
            rep = {"path": "streaming" if p is None else "resident", "bytes_read": 0 if p else 100,
                   "storage_bytes": 0, "seconds": 0.1}
            return [rep if p is None else {**rep, "captured": True, "placement": p, "resident_bytes": 5}]
        return [None]

    def reset_prefix_cache(self):
        pass

    def methods(self):
        return [m for m, _ in self.calls]


@pytest.fixture
def engine(llama, monkeypatch):
    def make(resident="auto", **fake):
        e = Engine(model=llama[0], options=EngineOptions(resident=resident), lazy=True)
        e._llm = FakeLLM(**fake)
        e._check_swap()
        return e
    return make


def _source(llama):
    return DeltaSource(base=str(llama[0]), reasoner=str(llama[1]))


def test_one_load_call_held_streaming_resident(engine, llama):
    e, src = engine(), _source(llama)
    first = e.load_alpha(source=src, config=MergeConfig(0.5))
    assert first["path"] == "resident" and first["placement"] == "cpu"
    assert e.load_alpha(source=src, config=MergeConfig(0.5)) == {"path": "held", "seconds": 0.0, "bytes_read": 0,
                                                                 "storage_bytes": 0}
    assert e.load_alpha(source=src, config=MergeConfig(0.5), force=True, resident="off")["path"] == "streaming"
    assert e._llm.methods().count("tvtool_resident_need") == 1  # decided once per source and operator setting
    e.load_alpha(source=src, config=MergeConfig(0.5, method="ties", density=0.5))
    assert e._llm.methods().count("tvtool_resident_need") == 2  # a new M: checked again
    assert not hasattr(Engine, "set_alpha") and not hasattr(Engine, "hold_alpha")


def test_auto_says_where_the_copies_go(engine, llama, capsys):
    e = engine()
    e.load_alpha(source=_source(llama), config=MergeConfig(0.5))
    assert capsys.readouterr().err.strip() == ("tvtool: resident α swap: θ1 and Δ kept in CPU memory (1.00 GiB per "
                                               "worker, 8.0 GiB free in CPU memory for 1 worker(s))")


def test_auto_that_does_not_fit_streams_with_a_one_line_notice(engine, llama, capsys):
    e = engine(need=8 * G, free_cpu=4 * G)
    assert e.load_alpha(source=_source(llama), config=MergeConfig(0.5))["path"] == "streaming"
    assert capsys.readouterr().err.strip() == (
        "tvtool: resident α swap does not fit (8.00 GiB per worker; no GPU, 4.0 GiB free in CPU memory for 1 "
        "worker(s)): every α streams from the checkpoints")
    e.load_alpha(source=_source(llama), config=MergeConfig(0.7))
    assert e._llm.methods().count("tvtool_resident_need") == 1 and capsys.readouterr().err == ""


def test_an_operator_whose_m_does_not_fit_later_streams_and_frees_the_copies(engine, llama, capsys):
    e, src = engine(), _source(llama)
    e.load_alpha(source=src, config=MergeConfig(0.5))
    capsys.readouterr()
    e._llm.need = 16 * G
    assert e.load_alpha(source=src, config=MergeConfig(0.5, method="ties", density=0.5))["path"] == "streaming"
    assert capsys.readouterr().err.strip() == ("tvtool: --resident cpu needs 16.00 GiB per worker, 8.0 GiB free in "
                                               "CPU memory for 1 worker(s): every α streams from now on")
    assert "tvtool_release" in e._llm.methods()


def test_an_explicit_placement_that_does_not_fit_is_refused_before_loading(engine, llama):
    e = engine(resident="cpu", need=8 * G, free_cpu=4 * G)
    with pytest.raises(OptionsError) as info:
        e.load_alpha(source=_source(llama), config=MergeConfig(0.5))
    assert str(info.value) == ("--resident cpu needs 8.00 GiB per worker, 4.0 GiB free in CPU memory for 1 "
                               "worker(s) (--resident cpu). Free memory, or use --resident auto (which streams what "
                               "does not fit) or off")
    assert "tvtool_load_alpha" not in e._llm.methods() and e.weights["kind"] == "folder"  # nothing loaded


def test_gpu_on_the_cpu_build_is_refused_in_one_line_before_any_engine_starts(llama, tmp_path):
    pytest.importorskip("vllm")
    r = cli("eval", "--base", llama[0], "--reasoner", llama[1], "--alpha", "0.5", "--dataset", "toy", "--limit", "1",
            "--resident", "gpu", "-o", tmp_path / "out")
    assert_one_line_error(r, "--resident gpu needs a GPU engine; this vLLM build runs on the CPU (--resident gpu). "
                             "Use --resident cpu or auto")
    assert not (tmp_path / "out" / "alpha-0.5").exists()


# --- the vLLM version check at engine start --------------------------------------------------------------


def test_a_missing_api_is_one_error_at_engine_start_for_an_explicit_resident(engine, capsys):
    with pytest.raises(EngineError) as info:
        engine(resident="cpu", version="0.40.1", missing=["vllm.model_executor.model_loader.reload.meta"])
    assert str(info.value) == ("vLLM 0.40.1 lacks what the resident α swap needs: "
                               "vllm.model_executor.model_loader.reload.meta (--resident cpu). Use --resident off "
                               "(streaming), or vLLM 0.32")
    with pytest.raises(EngineError, match="no in-place weight reload"):
        engine(resident="off", missing=["worker.reload_weights"])


def test_auto_on_a_vllm_without_the_api_says_so_once_and_streams(engine, llama, capsys):
    e = engine(version="0.40.1", missing=["vllm.distributed.weight_transfer.sharded_rdt_fake"])
    assert capsys.readouterr().err.strip() == (
        "tvtool: resident α swap off: vLLM 0.40.1 lacks vllm.distributed.weight_transfer.sharded_rdt_fake (tested "
        "with 0.32); every α streams from the checkpoints")
    assert e.load_alpha(source=_source(llama), config=MergeConfig(0.5))["path"] == "streaming"
    assert "tvtool_resident_need" not in e._llm.methods()


def test_an_untested_version_with_the_api_is_noted(engine, capsys):
    engine(version="0.33.0")
    assert capsys.readouterr().err.strip() == ("tvtool: note: vLLM 0.33.0 is not a version the in-place swap is "
                                               "tested with (0.32)")
    engine(version="0.32.4")
    assert capsys.readouterr().err == ""


def test_check_api_names_what_this_vllm_lacks(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.model_executor.model_loader.reload import layerwise

    from tvtool.engine.vllm_layout import check_api

    assert check_api() == []
    monkeypatch.delattr(layerwise, "_copy_and_restore_kernel_tensors")
    assert check_api() == ["vllm.model_executor.model_loader.reload.layerwise._copy_and_restore_kernel_tensors"]


def test_the_load_record_sums_the_workers():
    rec = load_record([{"path": "resident", "bytes_read": 0, "storage_bytes": 0, "captured": False,
                        "placement": "cpu", "resident_bytes": 10, "processing_s": 0.5},
                       {"path": "resident", "bytes_read": 3, "storage_bytes": 1, "captured": True,
                        "placement": "cpu", "resident_bytes": 12, "processing_s": 0.25}], seconds=1.23456)
    assert rec == {"path": "resident", "seconds": 1.235, "bytes_read": 3, "storage_bytes": 1, "workers": 2,
                   "captured": True, "placement": "cpu", "resident_bytes": 12, "processing_s": 0.5}


def test_the_load_is_information_not_identity(llama, tmp_path, monkeypatch):
    """run.json's `load` sits beside the finished-work record, not in it: a run recorded before it existed
    (no `load`) is complete for a resident re-run, and --resident changes no record."""
    import json

    from engine_setup import RecordingEngine
    from tvtool.engine.options import SamplingOptions
    from tvtool.evaluation.evaluate import evaluate
    from tvtool.evaluation.runs import EvalOptions

    monkeypatch.setattr(Engine, "for_source", RecordingEngine.for_source)
    kw = dict(base=llama[0], reasoner=llama[1], alphas=(0.5,), output=tmp_path,
              sampling=SamplingOptions(max_tokens=4), options=EvalOptions(dataset="toy", limit=2, progress=False))
    evaluate(engine_options=EngineOptions(resident="off"), **kw)
    run = tmp_path / "alpha-0.5" / "toy" / "run.json"
    first = json.loads(run.read_text())
    assert first["load"]["path"] == "streaming" and "load" not in json.dumps(first["record"])
    run.write_text(json.dumps({k: v for k, v in first.items() if k != "load"}))  # as written before `load`
    RecordingEngine.made.clear()
    evaluate(engine_options=EngineOptions(resident="cpu"), **kw)
    again = json.loads(run.read_text())
    assert again["record"] == first["record"] and "load" not in again
    assert all(e.generated == [] for e in RecordingEngine.made)  # complete: nothing generated, nothing loaded
