"""The kinds of Δ term behind one Protocol, and a new kind added as one class (ARCHITECTURE.md, "a source of Δ").

- a base/reasoner pair, a delta file, a factored file and a PEFT adapter are `DeltaTerm`s, and a task vector
  reads names, shapes, rows, sources, provenance and side files through the Protocol only;
- a new kind (here: a Δ stored divided by a power of two, its scale in the metadata) is one class registered
  with `file_kind`: `--delta` opens it, its fingerprint is its file's, and materialize and the engine's load
  give the bytes of the pair it came from.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

import tvtool
import tvtool.vectors.terms as terms
from helpers import assert_bit_equal, engine_loaded
from tiny import state_dict
from tvtool import DeltaSource, MaterializeOptions, MergeConfig, TaskVector
from tvtool.io.checkpoint import Checkpoint
from tvtool.lowrank.svd import LowRankOptions, svd_rank
from tvtool.vectors.terms import DeltaFile, DeltaTerm, FactoredFile, PairTerm, file_kind


def test_every_kind_is_a_delta_term(llama, f32_deltas, lora_pair, tmp_path):
    base, reasoner = llama
    factored = svd_rank(source=DeltaSource(delta=f32_deltas["llama"]), output=tmp_path / "f.safetensors",
                        options=LowRankOptions(rank=2, progress=False)).output
    kinds = {type(TaskVector.between(base, reasoner).terms[0][1]): "pair",
             type(TaskVector.load(f32_deltas["llama"]).terms[0][1]): "delta",
             type(TaskVector.load(factored).terms[0][1]): "factored",
             type(TaskVector.load(lora_pair.adapters[0]).terms[0][1]): "adapter"}
    assert len(kinds) == 4 and PairTerm in kinds and DeltaFile in kinds and FactoredFile in kinds
    for kind in kinds:
        assert issubclass(kind, DeltaTerm), kind  # the Protocol's methods, all of them


class ScaledDelta:
    """A Δ stored divided by `tvtool.scale` (a new kind of Δ for the test): one class, registered below."""

    needs_checkpoint = True

    def __init__(self, ckpt: Checkpoint):
        self.ckpt, self.scale = ckpt, float(ckpt.metadata["tvtool.scale"])

    @classmethod
    def open(cls, probe):
        return cls(probe.checkpoint) if probe.checkpoint.metadata.get("tvtool.kind") == "scaled-delta" else None

    def names(self):
        return self.ckpt.names()

    def shape(self, name):
        return tuple(self.ckpt.info(name).shape)

    def rows(self, name, start=0, stop=None):
        return self.ckpt.read(name, start, stop).float() * self.scale

    def sources(self):
        return [self.ckpt.source.path]

    def provenance(self):
        return {"delta": self.ckpt.source.describe(), "scale": self.scale}

    def side_files(self):
        return {}  # no config: the merge takes the base's

    def describe(self):
        return {"scaled-delta": self.ckpt.source.ref}

    def pair(self):
        return None


def test_a_new_kind_of_delta_is_one_class(llama, f32_deltas, tmp_path, monkeypatch):
    base, reasoner = llama
    monkeypatch.setattr(terms, "_FILE_KINDS", list(terms._FILE_KINDS))  # registered for this test only
    file_kind(ScaledDelta)
    path = tmp_path / "scaled.safetensors"
    save_file({n: t / 4 for n, t in load_file(f32_deltas["llama"]).items()}, path,  # exact: a power of two
              metadata={"format": "pt", "tvtool.kind": "scaled-delta", "tvtool.scale": "4"})
    source = DeltaSource(base=str(base), delta=str(path))
    assert isinstance(TaskVector.load(path).terms[0][1], DeltaTerm)
    assert source.fingerprint_record()["inputs"]["delta"]["files"][0]["file"] == "scaled.safetensors"
    opts = MaterializeOptions(alphas=(0.35, 1.0), config_from="base", progress=False)
    got = tvtool.materialize(source=source, output=tmp_path / "new", options=opts).folders
    want = tvtool.materialize(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path / "pair",
                              options=opts).folders
    for a in (0.35, 1.0):
        assert_bit_equal(state_dict(got[a]), state_dict(want[a]))
        assert_bit_equal(engine_loaded(source, MergeConfig(a)), state_dict(want[a]))
    assert torch.equal(TaskVector.load(path).get("model.norm.weight"), TaskVector.load(f32_deltas["llama"]).get(
        "model.norm.weight"))
