"""Records made before the operator registry still count as finished (except one, marked: its output
changed): the dicts and fingerprints pinned here were produced by the code before it (MergeConfig.to_dict,
operator_settings, folder names, DeltaSource records, materialize/svd-rank fingerprints), key order
included (the report's `params` column follows it)."""

from __future__ import annotations

import json

import pytest

from tvtool.lowrank.svd import LowRankOptions, lowrank_record
from tvtool.merge.config import MergeConfig
from tvtool.merge.materialize import materialize_record
from tvtool.merge.options import MaterializeOptions
from tvtool.merge.options import MergeOptions, config_name, operator_settings
from tvtool.vectors.source import DeltaSource

CASES = [  # (config, its to_dict, operator_settings with more=("r2",) for several vectors, folder name, fingerprint)
    (MergeConfig(0.6), {"alpha": 0.6, "include": None, "exclude": None}, None, "alpha-0.6",
     "44a186583b70447135941ffb68dece36d85c4fc4862e055a856b7274455b20b1"),
    (MergeConfig(0.5, "mlp", "norm"), {"alpha": 0.5, "include": "mlp", "exclude": "norm"}, None, "alpha-0.5",
     "e2c668e8c9c240df5304fe7e75a91ea08d3eef991ef62c3465681efb4d39aabd"),
    (MergeConfig(0.55, method="ties", density=0.3, weights=(0.7, 0.5)),
     {"alpha": 0.55, "include": None, "exclude": None, "method": "ties", "weights": [0.7, 0.5], "density": 0.3},
     {"method": "ties", "weights": [0.7, 0.5], "density": 0.3, "more": ["r2"]}, "ties-d0.3-c82e03bc-alpha-0.55",
     "8b6b5e50ab1a07d85b8a26e7cf786e469af5a077daa606d0283f9bf29680d414"),
    (MergeConfig(0.8, method="dare_ties", p=0.5, seed=3),
     {"alpha": 0.8, "include": None, "exclude": None, "method": "dare_ties", "p": 0.5, "seed": 3},
     {"method": "dare_ties", "p": 0.5, "seed": 3}, "dare_ties-p0.5-s3-alpha-0.8",
     "c86f231f062e772c88e67dac9ce69bd502e3265c311a0cb57387be54eeca9c71"),
    (MergeConfig(0.8, method="dare_linear", p=(0.4, 0.6), weights=(1.0, 0.5)),
     {"alpha": 0.8, "include": None, "exclude": None, "method": "dare_linear", "weights": [1.0, 0.5], "p": [0.4, 0.6]},
     # the one record that changed on purpose: several vectors under DARE once shared one mask (fingerprint then
     # df1cdac97effbf00723f53b100355c1d37f24a37d63c3d3f2bf41d11de8c4b75); each draws its own now, so such outputs
     # are redone (MergeConfig.record); the settings, the folder name and to_dict are the same
     {"method": "dare_linear", "weights": [1.0, 0.5], "p": [0.4, 0.6], "mask": "per-vector", "more": ["r2"]},
     "dare_linear-p0.4,0.6-s0-d71e6515-alpha-0.8", "17f2ba6aedfcbbfe26640a7c7ff92bce0cc2964473e08cbba155774b03fe9bd7"),
    (MergeConfig(0.7, method="task_arithmetic", weights=(1.0, -0.4), rules=((r"mlp|o_proj", 1.0), (r".", 0.5)),
                 schedule=(0.25, 1.0)),
     {"alpha": 0.7, "include": None, "exclude": None, "weights": [1.0, -0.4], "rules": [["mlp|o_proj", 1.0], [".", 0.5]],
      "schedule": [0.25, 1.0]},
     {"weights": [1.0, -0.4], "rules": [["mlp|o_proj", 1.0], [".", 0.5]], "schedule": [0.25, 1.0], "more": ["r2"]},
     "task_arithmetic-67e310f3-alpha-0.7", "83082b949692e09410a1e9004429bf427f4b8df95ef591a8af3e3f0c76ae8bab"),
    (MergeConfig(0.6, method="breadcrumbs", beta=0.02, gamma=0.3, include="layers"),
     {"alpha": 0.6, "include": "layers", "exclude": None, "method": "breadcrumbs", "beta": 0.02, "gamma": 0.3},
     {"method": "breadcrumbs", "beta": 0.02, "gamma": 0.3}, "breadcrumbs-b0.02-g0.3-alpha-0.6",
     "512283ff4cde8d8f52c7be9af9229a8684da0a1c6e2aa78b3a3d80e78fe6273b"),
    (MergeConfig(1.0, method="trim", density=0.2, normalize=True),
     {"alpha": 1.0, "include": None, "exclude": None, "method": "trim", "density": 0.2, "normalize": True},
     {"method": "trim", "density": 0.2, "normalize": True}, "trim-d0.2-3c3e436f-alpha-1",
     "99a5bbf4f6711cc8f9667a08a1e06609bfcfd04afbeb224c5a0ac791670e8964"),
    (MergeConfig(0.9, method="ties", density=(0.25, 0.6), weights=(0.8, 0.5), normalize=False),
     {"alpha": 0.9, "include": None, "exclude": None, "method": "ties", "weights": [0.8, 0.5], "density": [0.25, 0.6],
      "normalize": False},
     {"method": "ties", "weights": [0.8, 0.5], "density": [0.25, 0.6], "normalize": False, "more": ["r2"]},
     "ties-d0.25,0.6-5e0ada96-alpha-0.9", "4f21d99a96eb8fbcf371aed6aae0f0359ead06edf446fbf094fd3cf08fcf0407"),
]
INPUTS = {"options": {"allow_missing": False, "vocab": "error", "allow_pickle": False},
          "inputs": {"base": {"x": 1}, "reasoner": {"y": 2}}}


@pytest.mark.parametrize("config,as_dict,settings,name,fingerprint", CASES)
def test_merge_config_records_are_unchanged(config, as_dict, settings, name, fingerprint):
    d = json.loads(json.dumps(config.to_dict()))
    assert d == as_dict and list(d) == list(as_dict)  # key order too: the report's params follow it
    more = ("r2",) if len(config.weights) > 1 else ()
    assert operator_settings(config, more=more) == settings
    assert config_name(config) == name
    assert materialize_record(INPUTS, config, MaterializeOptions())["fingerprint"] == fingerprint
    assert MergeConfig.from_dict(d) == config and hash(MergeConfig.from_dict(d)) == hash(config)


def test_merge_options_make_the_same_configs():
    (c,) = MergeOptions(method="ties", density=0.3, weights=(0.7, 0.5)).configs([0.5])
    assert c == MergeConfig(0.5, method="ties", density=0.3, weights=(0.7, 0.5))
    assert c.to_dict() == {"alpha": 0.5, "include": None, "exclude": None, "method": "ties", "weights": (0.7, 0.5),
                           "density": 0.3}


def test_source_records_are_unchanged():
    s = DeltaSource(base="b", reasoner="r", vocab="intersect", more=("r2",))
    assert json.loads(json.dumps(s.to_dict())) == {"base": "b", "delta": None, "reasoner": "r", "allow_missing": False,
                                                   "vocab": "intersect", "allow_pickle": False, "more": ["r2"]}
    assert s.describe() == {"base": "b", "delta": None, "reasoner": "r", "more": ["r2"]}
    assert DeltaSource(base="b", reasoner="r", vocab="intersect").to_dict() == {
        "base": "b", "delta": None, "reasoner": "r", "allow_missing": False, "vocab": "intersect", "allow_pickle": False}


def test_svd_rank_records_are_unchanged(monkeypatch):
    import tvtool.vectors.source

    monkeypatch.setattr(tvtool.vectors.source, "input_fingerprint",  # the inputs' content, given (no files)
                        lambda ref, **kw: {"x": 1} if ref == "b" else {"y": 2})
    src = DeltaSource(base="b", delta="d")
    assert src.fingerprint_record() == {"options": {"allow_missing": False, "vocab": "error", "allow_pickle": False},
                                        "inputs": {"base": {"x": 1}, "delta": {"y": 2}}}
    assert lowrank_record(src, LowRankOptions(rank=2), operator={"method": "trim", "density": 0.3})["fingerprint"] == \
        "891fdc5c06ef4c3bf03e24349e369976ddc52d48cb7fd5cb9960e2e7798fe473"
    assert lowrank_record(src, LowRankOptions(rank=2))["fingerprint"] == \
        "fd1f0fee0f7883202423487e2d63a8e97103cc3f8929cb37fe427b14e5b3615c"
