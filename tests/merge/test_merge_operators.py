"""The operators on the one merge path: materialize, the in-engine load and the CLI agree bit for bit.

- several (operator, α) configurations over two task vectors in ONE materialize run equal an
  independent streaming harness (`test_mergekit_operators.ours`, which mergekit checks) and the
  bytes each vLLM worker would receive (`merged_tensors` through `WorkerExtension`), with the
  materialize stream cut into small chunks (selection passes across chunk boundaries);
- each input is read once per pass the operators need;
- CLI flags (`--method`, `--density`, `--vector`, `--alpha-rule`, `--layer-schedule`) give the
  same bytes as the Python API; bad settings give one line and exit code 2;
- the in-engine sweep with an operator equals a fresh run of the materialized folder (vLLM).
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import tvtool
import tvtool.merge.stream
from helpers import assert_bit_equal
from helpers import engine_loaded as _loaded
from operator_ref import ours
from tiny import state_dict
from tvtool import DeltaSource, MaterializeOptions, MergeConfig
from tvtool.cli import main
from tvtool.merge.options import MergeOptions, config_name
from tvtool.io.safetensors_io import row_chunks

CONFIGS = [
    MergeConfig(0.55, method="ties", density=0.3, weights=(0.7, 0.5)),
    MergeConfig(1.0, method="ties", density=0.3, weights=(0.7, 0.5)),  # α = 1: no θ2 shortcut for an operator
    MergeConfig(0.8, method="dare_ties", p=0.5, seed=3),
    MergeConfig(0.7, method="task_arithmetic", weights=(1.0, -0.4), rules=((r"mlp|o_proj", 1.0), (r".", 0.5)),
                schedule=(0.25, 1.0)),
    MergeConfig(0.6, method="breadcrumbs", beta=0.02, gamma=0.3, include="layers"),
]


@pytest.fixture(scope="module")
def written(trio, tmp_path_factory):
    """The CONFIGS materialized in one run, streamed in 4096-element chunks; (result, read counts)."""
    base, r1, r2 = trio
    mp = pytest.MonkeyPatch()
    mp.setattr(tvtool.merge.stream, "row_chunks", lambda shape, max_elems=4096: row_chunks(shape, 4096))
    reads: dict[str, int] = {}
    orig = tvtool.io.checkpoint.Checkpoint.read

    def counted(self, name, start=0, stop=None):
        reads[f"{self.source.path.name}:{name}"] = reads.get(f"{self.source.path.name}:{name}", 0) + 1
        return orig(self, name, start, stop)

    mp.setattr(tvtool.io.checkpoint.Checkpoint, "read", counted)
    try:
        res = tvtool.materialize(source=DeltaSource(base=base, reasoner=r1, more=(r2,)),
                                 output=tmp_path_factory.mktemp("ops"), configs=CONFIGS,
                                 options=MaterializeOptions(progress=False, max_shard_size="300KB"))
    finally:
        mp.undo()
    return res, reads


def test_one_run_writes_every_configuration_equal_to_the_streaming_reference(trio, written):
    base, r1, r2 = trio
    res, _ = written
    assert list(res.configs) == CONFIGS
    names = [f.name for f in res.configs.values()]
    assert [n.rsplit("-", 2)[0] for n in names[:2]] == [CONFIGS[0].tag()] * 2 and names[0].endswith("-alpha-0.55")
    assert CONFIGS[0].tag().startswith("ties-d0.3-") and names[2] == "dare_ties-p0.5-s3-alpha-0.8"
    assert names[3].startswith("task_arithmetic-") and names[4] == "breadcrumbs-b0.02-g0.3-alpha-0.6"
    refs, _ = ours(base, [r1, r2], CONFIGS[:4])
    B = state_dict(base)
    for c, ref in zip(CONFIGS[:4], refs):
        assert_bit_equal(state_dict(res.configs[c]), ref)
    # breadcrumbs with include: tensors outside `layers` stay θ1 as stored
    (bc,), _ = ours(base, [r1, r2], [CONFIGS[4]])
    got = state_dict(res.configs[CONFIGS[4]])
    assert_bit_equal({n: t for n, t in got.items() if "layers" in n}, {n: t for n, t in bc.items() if "layers" in n})
    assert_bit_equal({n: t for n, t in got.items() if "layers" not in n}, {n: B[n] for n in got if "layers" not in n})
    rec = json.loads((res.configs[CONFIGS[0]] / "tvtool.json").read_text())["settings"]
    assert rec["merge"] == {"method": "ties", "density": 0.3, "weights": [0.7, 0.5]} and rec["more"] == [str(r2)]


def test_engine_receives_the_materialized_bytes(trio, written):
    base, r1, r2 = trio
    res, _ = written
    source = DeltaSource(base=str(base), reasoner=str(r1), more=(str(r2),))
    for c in CONFIGS:
        assert_bit_equal(_loaded(source, c), state_dict(res.configs[c]))  # whole tensors vs 4096-element chunks


def test_each_input_is_read_once_per_pass(trio, written):
    base, r1, r2 = trio
    _, reads = written
    for name in tvtool.io.checkpoint.Checkpoint.open(base).names():
        shape = tvtool.io.checkpoint.Checkpoint.open(base).info(name).shape
        n = len(row_chunks(tuple(shape), 4096))
        # 2 selection passes (TIES, breadcrumbs) + the write pass, + 1 chunk per magnitude cut (3 per vector)
        # whose ties straddle a chunk boundary
        for model in (base, r1, r2):
            got = reads.get(f"{model.name}:{name}", 0)
            assert (got == n) if n == 1 else (3 * n <= got <= 3 * n + 6), (model.name, name, n, got)


def test_cli_flags_equal_the_python_api(trio, tmp_path):
    base, r1, r2 = trio
    args = ["materialize", str(base), "--vector", f"{r1}:0.7", "--vector", f"{r2}:0.5", "--method", "ties",
            "--density", "0.3", "--alpha", "0.55", "--alpha-rule", "mlp|o_proj=1", "--alpha-rule", ".=0.5",
            "--layer-schedule", "0.25:1", "-o", str(tmp_path / "cli"), "--no-progress"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    c = MergeConfig(0.55, method="ties", density=0.3, weights=(0.7, 0.5), rules=(("mlp|o_proj", 1.0), (".", 0.5)),
                    schedule=(0.25, 1.0))
    folder = tmp_path / "cli" / config_name(c)
    (ref,), _ = ours(base, [r1, r2], [c])
    assert_bit_equal(state_dict(folder), ref)
    assert "--method ties --vector" in (folder / "README.md").read_text()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "(already complete)" in again.output


@pytest.mark.parametrize("flags,message", [
    (["--method", "ties", "--density", "0"],
     "density must be in (0, 1], got 0.0 (merge.density). Density is the fraction of each Δ kept, e.g. 0.2"),
    (["--method", "dare_linear", "--drop-p", "1"],
     "DARE drop probability p must be in [0, 1), got 1.0 (merge.p). P is the fraction of Δ dropped, e.g. 0.9"),
    (["--layer-schedule", "0.5"], "bad layer schedule '0.5' (--layer-schedule). Write FIRST:LAST, e.g. 0.5:1.0"),
    (["--alpha-rule", "mlp"], "bad α rule 'mlp' (--alpha-rule). Write REGEX=FACTOR, e.g. mlp=1.0"),
])
def test_bad_operator_settings_are_one_line(trio, tmp_path, flags, message):
    base, r1, _ = trio
    r = CliRunner().invoke(main, ["materialize", str(base), "--reasoner", str(r1), "--alpha", "0.5",
                                  "-o", str(tmp_path), "--no-progress", *flags])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [f"tvtool: error: {message}"], r.output


def test_task_vectors_of_different_architectures_are_refused(pairs, tmp_path):
    base, r1 = pairs["llama"]
    r = CliRunner().invoke(main, ["materialize", str(base), "--reasoner", str(r1), "--vector", str(pairs["qwen2"][1]),
                                  "--method", "ties", "--density", "0.5", "--alpha", "0.5", "-o", str(tmp_path),
                                  "--no-progress"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert r.output.startswith("tvtool: error: ") and "only one model" in r.output


@pytest.mark.vllm
def test_in_engine_operator_sweep_equals_the_materialized_folder(vengine, tmp_path):
    from tvtool.evaluation.evaluate import evaluate
    from tvtool.evaluation.runs import EvalOptions
    from tvtool.evaluation.results import read_samples

    opts = EvalOptions(limit=3, batch_size=8, progress=False, params_b=1, include="mlp|self_attn")
    merge = MergeOptions(method="ties", density=0.3)
    from tvtool.engine.options import SamplingOptions

    sampling = SamplingOptions(max_tokens=24)
    source = DeltaSource(base=vengine.base, reasoner=vengine.reasoner)
    res = evaluate(source=source, alphas=(0.8,), output=tmp_path / "sweep",
                   engine=vengine.engine, sampling=sampling, options=opts, merge=merge)
    c = MergeConfig(0.8, include="mlp|self_attn", method="ties", density=0.3)
    assert vengine.engine.weights["config"] == c.to_dict()
    mat = tvtool.materialize(source=source, output=tmp_path / "mat",
                             options=MaterializeOptions(alphas=(0.8,), include="mlp|self_attn", progress=False),
                             merge=merge).configs[c]
    ref = evaluate(model=mat, output=tmp_path / "ref", engine=vengine.engine, sampling=sampling,
                   options=EvalOptions(limit=3, batch_size=8, progress=False, params_b=1))
    got = read_samples(tmp_path / "sweep" / config_name(c) / "gsm8k" / "samples.jsonl")
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in read_samples(tmp_path / "ref" / "samples.jsonl")]
    assert res.runs[0].summary == ref.runs[0].summary


def test_one_pair_trimmed_in_chunks_equals_whole_tensors_and_the_reference(trio, tmp_path):
    """One bf16 pair: the selection passes histogram Δ formed per element from θ1/θ2 rows (kernels.PairRows);
    4096-element chunks give the bytes of whole tensors (the engine's load) and of the torch reference."""
    base, r1, _ = trio
    configs = [MergeConfig(0.55, method="ties", density=0.3), MergeConfig(1.0, method="trim", density=0.2),
               MergeConfig(0.7, method="dare_linear", p=0.3, seed=2), MergeConfig(0.9, method="dare_ties", p=0.5),
               MergeConfig(0.6)]
    mp = pytest.MonkeyPatch()
    mp.setattr(tvtool.merge.stream, "row_chunks", lambda shape, max_elems=4096: row_chunks(shape, 4096))
    pairs = []
    orig = tvtool.merge.kernels.hist_hi
    mp.setattr(tvtool.merge.kernels, "hist_hi", lambda x, h: (pairs.append(isinstance(x, tvtool.merge.kernels.PairRows)),
                                                        orig(x, h))[1])
    try:
        res = tvtool.materialize(source=DeltaSource(base=base, reasoner=r1), output=tmp_path / "m", configs=configs,
                                 options=MaterializeOptions(progress=False))
    finally:
        mp.undo()
    assert any(pairs)  # the chunked selection passes ran on θ1/θ2 rows
    refs, _ = ours(base, [r1], configs[:4])
    source = DeltaSource(base=str(base), reasoner=str(r1))
    for c, ref in zip(configs, refs + [None]):
        got = state_dict(res.configs[c])
        assert_bit_equal(got, _loaded(source, c))
        if ref is not None:
            assert_bit_equal(got, ref)


def test_a_folder_written_when_dare_vectors_shared_one_mask_is_not_taken_as_finished(trio, tmp_path):
    """Several vectors under DARE once shared one mask. A folder written then has a record without the
    per-vector mask: a re-run refuses it as made otherwise (or redoes it with --overwrite), never takes it
    as finished. One vector's mask never changed, so its record did not either."""
    from tvtool.errors import OutputError
    from tvtool.io.finished import stage_record

    base, r1, r2 = trio
    c = MergeConfig(0.8, method="dare_linear", p=0.5, seed=3, weights=(1.0, 1.0))
    one = MergeConfig(0.8, method="dare_linear", p=0.5, seed=3)
    assert one.record() == one.to_dict() and c.record() == {**c.to_dict(), "mask": "per-vector"}
    assert MergeConfig.from_record(c.record()) == c
    src = DeltaSource(base=base, reasoner=r1, more=(r2,))
    folder = tvtool.materialize(source=src, output=tmp_path, configs=[c],
                                options=MaterializeOptions(progress=False)).configs[c]
    meta = json.loads((folder / "tvtool.json").read_text())
    rec = meta["record"]
    assert rec["options"]["mask"] == "per-vector"
    meta["record"] = stage_record(stage=rec["stage"], options={k: v for k, v in rec["options"].items() if k != "mask"},
                                  inputs=rec["inputs"])  # as the earlier version wrote it
    (folder / "tvtool.json").write_text(json.dumps(meta))
    with pytest.raises(OutputError) as e:
        tvtool.materialize(source=src, output=tmp_path, configs=[c], options=MaterializeOptions(progress=False))
    assert str(e.value) == (f"the output holds a result made from other inputs or options (mask null → per-vector) "
                            f"({folder}). Pass --overwrite to redo it, or choose another output")
    again = tvtool.materialize(source=src, output=tmp_path, configs=[c],
                               options=MaterializeOptions(progress=False, overwrite=True))
    assert json.loads((again.configs[c] / "tvtool.json").read_text())["record"]["options"]["mask"] == "per-vector"
