"""The one merge path and the one description of Δ's source.

- materialize (bytes written) and the in-engine loader (bytes streamed into each vLLM
  worker) receive the same tensors for the same settings, include/exclude included;
- one merged config for a materialized folder and an engine's shell model;
- `DeltaSource`: validated once, plain data across processes, a fingerprint that follows
  the options and the inputs' content (local files, Hub commits in the real cache layout);
- `evaluate` finds finished runs before any engine starts.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tvtool
from helpers import assert_bit_equal, bits, engine_loaded as _loaded
from tiny import state_dict
from tvtool import DeltaSource, MaterializeOptions, MergeConfig
from tvtool.engine.engine import write_shell_model
from tvtool.errors import OptionsError

SELECTIONS = [(None, None), ("mlp", None), (None, r"self_attn\.(q|k)_proj"), ("layers", "bias|norm")]


@pytest.mark.parametrize("include,exclude", SELECTIONS)
@pytest.mark.parametrize("arch,via", [("llama", "reasoner"), ("qwen2", "reasoner"), ("tied", "reasoner"),
                                      ("llama", "delta")])
def test_materialize_and_engine_loader_receive_the_same_bytes(pairs, f32_deltas, tmp_path, arch, via, include, exclude):
    base, reasoner = pairs[arch]
    src = {"reasoner": reasoner} if via == "reasoner" else {"delta": f32_deltas[arch]}
    alphas = (0.0, 0.35, 1.0, -0.5)
    source = DeltaSource(base=base, **src)
    res = tvtool.materialize(source=source, output=tmp_path, options=MaterializeOptions(
        alphas=alphas, include=include, exclude=exclude, progress=False, max_shard_size="300KB"))
    B, R = state_dict(base), state_dict(reasoner)
    for a in alphas:
        written = state_dict(res.folders[a])
        loaded = _loaded(source, MergeConfig(a, include, exclude))
        assert set(loaded) == set(written)
        assert_bit_equal(loaded, written)
        cfg = MergeConfig(a, include, exclude)
        for n, t in written.items():  # the selection really selects: unselected tensors are θ1 as stored
            if n in B and not cfg.selects(n):
                assert torch.equal(bits(t), bits(B[n])), n
        if a == 1.0 and via == "reasoner" and include is None and exclude is None:
            assert_bit_equal(loaded, R, names=[n for n in R if n in loaded])  # α = 1 is θ2 bit for bit


def test_selection_changes_only_the_selected_tensors(llama, tmp_path):
    base, reasoner = llama
    source = DeltaSource(base=base, reasoner=reasoner)
    full, mlp = _loaded(source, MergeConfig(0.5)), _loaded(source, MergeConfig(0.5, include="mlp"))
    B = state_dict(base)
    changed = {n for n in full if not torch.equal(bits(full[n]), bits(B[n]))}
    assert changed and any("mlp" in n for n in changed) and any("mlp" not in n for n in changed)
    for n in full:
        assert torch.equal(bits(mlp[n]), bits(full[n] if "mlp" in n else B[n])), n


@pytest.mark.parametrize("arch", ["llama", "tied"])
@pytest.mark.parametrize("config_from", ["reasoner", "base"])
def test_engine_shell_model_has_the_materialized_config(pairs, tmp_path, arch, config_from):
    base, reasoner = pairs[arch]
    res = tvtool.materialize(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path / "m",
                             options=MaterializeOptions(alphas=(0.5,), config_from=config_from, progress=False))
    shell = write_shell_model(source=DeltaSource(base=base, reasoner=reasoner), folder=tmp_path / "shell",
                              config_from=config_from)
    written = res.folders[0.5]
    assert {f.name for f in shell.iterdir()} >= {"config.json", "tokenizer.json"}
    for f in shell.iterdir():
        assert f.read_bytes() == (written / f.name).read_bytes(), f.name
    side = (Path(reasoner) if config_from == "reasoner" else Path(base)) / "tokenizer_config.json"
    assert (shell / "tokenizer_config.json").read_bytes() == side.read_bytes()


def test_engine_shell_model_checks_vocab_size(llama, tmp_path):
    base, reasoner = llama
    bad = tmp_path / "reasoner"
    shutil.copytree(reasoner, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 7}))
    with pytest.raises(tvtool.errors.MismatchError, match="vocab_size"):
        write_shell_model(source=DeltaSource(base=base, reasoner=bad), folder=tmp_path / "shell")


# --- DeltaSource -------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(base="b"), dict(base="b", delta="d", reasoner="r")])
def test_exactly_one_source_is_checked_in_one_place(kw):
    with pytest.raises(OptionsError) as e:
        DeltaSource(**kw)
    assert str(e.value) == "give exactly one of --delta and --reasoner. Δ comes from a delta file or a reasoner"


def test_source_is_frozen_plain_data(llama):
    s = DeltaSource(base=Path(llama[0]), reasoner=Path(llama[1]), vocab="intersect")
    assert s.base == str(llama[0])  # paths are kept as strings
    assert pickle.loads(pickle.dumps(s)) == s and DeltaSource.from_dict(s.to_dict()) == s
    assert json.loads(json.dumps(s.to_dict())) == s.to_dict()
    with pytest.raises(AttributeError):
        s.base = "x"
    assert hash(s) == hash(DeltaSource.from_dict(s.to_dict()))


def test_fingerprint_follows_options_and_input_content(llama, tmp_path):
    base, reasoner = llama
    b, r = tmp_path / "base", tmp_path / "reasoner"
    shutil.copytree(base, b)
    shutil.copytree(reasoner, r)
    s = DeltaSource(base=b, reasoner=r)
    fp = s.fingerprint()
    assert len(fp) == 64 and fp == DeltaSource(base=b, reasoner=r).fingerprint()
    assert DeltaSource(base=b, reasoner=r, vocab="intersect").fingerprint() != fp
    rec = s.fingerprint_record()
    shard = rec["inputs"]["reasoner"]["files"][0]
    assert shard["size"] == (r / shard["file"]).stat().st_size
    # the recorded hash is the sha256 of the safetensors header (8-byte length + JSON)
    data = (r / shard["file"]).read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert shard["sha256"] == hashlib.sha256(data[:8 + n]).hexdigest()
    # an edited config changes it; so does a re-saved reasoner with other tensors
    cfg = json.loads((r / "config.json").read_text())
    (r / "config.json").write_text(json.dumps({**cfg, "rope_theta": 1234.0}))
    fp2 = s.fingerprint()
    assert fp2 != fp
    sd = load_file(r / shard["file"])
    sd["extra.weight"] = torch.zeros(2)
    save_file(sd, r / shard["file"], metadata={"format": "pt"})
    assert s.fingerprint() not in (fp, fp2)


@pytest.fixture
def real_hub_cache(llama, monkeypatch):
    """tiny-org/base and tiny-org/reasoner in the real cache layout: snapshots/<sha>/f -> ../../blobs/<hash>."""
    import os

    from huggingface_hub import constants

    cache = Path(os.environ["HF_HOME"]) / "hub-layout"
    shas = {}
    for name, src, sha in (("base", llama[0], "c" * 40), ("reasoner", llama[1], "d" * 40)):
        repo = cache / f"models--tiny-org--{name}"
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        snap = repo / "snapshots" / sha
        snap.mkdir(parents=True, exist_ok=True)
        for f in Path(src).iterdir():
            blob = hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copyfile(f, repo / "blobs" / blob)
            link = snap / f.name
            if not link.exists():
                link.symlink_to(Path("..") / ".." / "blobs" / blob)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(sha)
        shas[name] = sha
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return shas


def test_fingerprint_of_hub_ids_is_the_resolved_commit(real_hub_cache, llama):
    s = DeltaSource(base="tiny-org/base", reasoner="tiny-org/reasoner")
    inputs = s.fingerprint_record()["inputs"]
    assert inputs["base"] == {"repo_id": "tiny-org/base", "commit": real_hub_cache["base"]}
    assert inputs["reasoner"] == {"repo_id": "tiny-org/reasoner", "commit": real_hub_cache["reasoner"]}
    pinned = DeltaSource(base=f"tiny-org/base@{real_hub_cache['base']}", reasoner="tiny-org/reasoner")
    assert pinned.fingerprint_record()["inputs"] == inputs
    # and the Hub-id source merges to the same bytes as the local folders
    local = _loaded(DeltaSource(base=llama[0], reasoner=llama[1]), MergeConfig(0.3))
    assert_bit_equal(_loaded(s, MergeConfig(0.3)), local)


# --- finished runs start no engine ----------------------------------------------------------------


class _FakeEngine:
    """An engine that never starts vLLM: records weight loads, answers every prompt with one token."""

    made: list["_FakeEngine"] = []

    def __init__(self, *, source, options, seed=0, lazy=False, **_):
        from tvtool.engine.options import EngineOptions

        self.options, self.tokenizer, self.starts, self.loads = EngineOptions(), None, 0, []
        self.weights = {"kind": "dummy", "path": "shell"}
        _FakeEngine.made.append(self)

    def sampling_record(self, sampling):
        return {"max_tokens": sampling.max_tokens}

    def prompts(self, *, questions, options):
        return list(questions)

    def check_prompts(self, *, prompts, add_special_tokens=True):
        pass

    def load_alpha(self, *, source, config, force=False):
        from tvtool.engine.engine import HELD, alpha_weights

        if self.weights == alpha_weights(source=source, config=config):
            return dict(HELD)
        self.starts = 1
        self.loads.append(config)
        self.weights = alpha_weights(source=source, config=config)
        return {"path": "streaming", "seconds": 0.0, "bytes_read": 0, "storage_bytes": 0, "workers": 1}

    def generate(self, *, prompts, sampling, lora=None, add_special_tokens=True):
        from tvtool.engine.options import Sample

        assert self.weights["kind"] == "alpha"
        return [[Sample(0, (7,), "\\boxed{1}", "stop")] for _ in prompts]

    def close(self):
        pass


def test_a_finished_sweep_is_found_before_any_engine_starts(llama, tmp_path, monkeypatch):
    from tvtool.engine.engine import Engine
    from tvtool.engine.options import SamplingOptions
    from tvtool.evaluation.evaluate import evaluate
    from tvtool.evaluation.runs import EvalOptions

    monkeypatch.setattr(Engine, "for_source", _FakeEngine)
    base, reasoner = llama
    kw = dict(source=DeltaSource(base=base, reasoner=reasoner), alphas=(0.2, 0.6), output=tmp_path,
              sampling=SamplingOptions(max_tokens=4),
              options=EvalOptions(limit=2, progress=False, params_b=1, include="mlp"))
    first = evaluate(**kw)
    assert first.engine_starts == 1 and [c.alpha for c in _FakeEngine.made[-1].loads] == [0.2, 0.6]
    assert {c.include for c in _FakeEngine.made[-1].loads} == {"mlp"}
    run = json.loads((tmp_path / "alpha-0.2" / "gsm8k" / "run.json").read_text())
    assert run["settings"]["model"]["include"] == "mlp" and run["settings"]["model"]["alpha"] == 0.2
    again = evaluate(**kw)
    assert again.engine_starts == 0 and _FakeEngine.made[-1].loads == []
    assert [r.summary for r in again.runs] == [r.summary for r in first.runs]
    with pytest.raises(OptionsError, match="--include/--exclude"):
        evaluate(model=base, output=tmp_path / "m", options=EvalOptions(include="mlp"))


def test_a_scaled_pair_is_applied_with_its_coefficient(llama):
    """0.5·Δ of a pair is θ1 + 0.5·Δ (the fused pair read applies only to the plain pair, coefficient 1)."""
    from tvtool.merge.stream import apply_to

    base, reasoner = llama
    tv = tvtool.TaskVector.between(base, reasoner)
    assert tv.pair() is not None and (0.5 * tv).pair() is None
    assert_bit_equal(dict(apply_to(0.5 * tv, base)), dict(apply_to(tv, base, alpha=0.5)))


def test_the_readmes_python_api_runs(trio, tmp_path, monkeypatch):
    """README.md's Python API block, on the tiny trio (Hub ids and folders replaced by local ones)."""
    import re

    base, r1, r2 = trio
    code = re.search(r"## Python API.*?```python\n(.*?)```", (Path(__file__).parents[2] / "README.md").read_text(),
                     re.S).group(1)
    for old, new in (("Qwen/Qwen2.5-32B-Instruct", base), ("Qwen/QwQ-32B-Preview", r1), ('"base/"', f'"{base}"'),
                     ('"reasoner/"', f'"{r1}"'), ('"r1/"', f'"{r1}"'), ('"r2/"', f'"{r2}"')):
        code = code.replace(old, str(new))
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("    ...", "    assert tensor.dtype == torch.bfloat16"), "README.md", "exec"),
         {"torch": torch})
    assert (tmp_path / "merged" / "alpha-0.4" / "tvtool.json").is_file()
    assert json.loads((tmp_path / "ties" / next((tmp_path / "ties").iterdir()).name / "tvtool.json").read_text()
                      )["settings"]["merge"] == {"method": "ties", "weights": [0.7, 0.5], "density": 0.2}
