"""What bad input and faults get: one place to scan. Each test reproduces one fault.

Every error is one exact line (what, where, what to do) and a non-zero exit, never a traceback;
nothing is half-written or silently wrong.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import tvtool
from engine_setup import RecordingEngine as _FakeEngine
from helpers import assert_bit_equal, assert_one_line_error, cli, hold_lock
from tiny import edited_copy as _edit, state_dict
from tvtool import Checkpoint, DeltaOptions, MaterializeOptions
from tvtool.errors import CheckpointError
from tvtool.io.lock import lock_path, output_lock
from tvtool.io.writer import ShardedWriter
from tvtool.vectors.source import DeltaSource

TOY = Path(tvtool.__file__).parent / "assets" / "toy"
ROOT = Path(__file__).resolve().parents[1]


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- sharded models given as Hub ids: the real cache layout (blobs + symlinks) -------------------------

from hub_fixture import ALICE, ENDPOINT  # noqa: E402


def test_sharded_hub_ids_through_the_real_cache_layout(hub, llama, tmp_path, monkeypatch):  # noqa: F811
    from huggingface_hub import HfApi, constants

    base, reasoner = llama
    api = HfApi(endpoint=ENDPOINT, token=ALICE)
    for name, src in (("sharded-base", base), ("sharded-reasoner", reasoner)):
        api.create_repo(f"alice/{name}", exist_ok=True)
        api.upload_folder(repo_id=f"alice/{name}", folder_path=str(src))
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "d.safetensors"
    r = cli("delta", "alice/sharded-base", "alice/sharded-reasoner", "-o", out, "--no-progress")
    assert r.exit_code == 0, r.stderr
    # the cache is laid out as huggingface_hub writes it: the shards are links into ../../blobs
    snap = next((cache / "models--alice--sharded-base" / "snapshots").iterdir())
    shard = sorted(snap.glob("model-*.safetensors"))[0]
    assert shard.is_symlink() and os.readlink(shard).startswith("../../blobs/")
    ref = tmp_path / "ref.safetensors"
    tvtool.delta(base=base, reasoner=reasoner, output=ref, options=DeltaOptions(progress=False))
    assert_bit_equal(load_file(out), load_file(ref))
    res = tvtool.materialize(source=DeltaSource(base="alice/sharded-base", reasoner="alice/sharded-reasoner"),
                             output=tmp_path / "m",
                             options=MaterializeOptions(alphas=(1.0,), progress=False))
    assert_bit_equal(state_dict(res.folders[1.0]), state_dict(reasoner))


def test_a_shard_linked_out_of_the_folder_is_still_refused(llama, tmp_path):
    base, reasoner = llama
    b = tmp_path / "b"
    shutil.copytree(base, b)
    shard = sorted(b.glob("model-*.safetensors"))[1]
    outside = tmp_path / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    r = cli("delta", b, reasoner, "-o", tmp_path / "d.safetensors")
    assert_one_line_error(r, f"index names a file outside the checkpoint folder: {shard.name!r} "
                             f"({b / 'model.safetensors.index.json'}). The index is unsafe or damaged; re-create it")


def test_a_cache_snapshot_link_leaving_the_repo_folder_is_refused(llama, tmp_path):
    base, _ = llama
    repo = tmp_path / "hub" / "models--org--evil"
    snap = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    shutil.copytree(base, snap)
    shard = sorted(snap.glob("model-*.safetensors"))[0]
    shard.rename(tmp_path / "stolen")
    shard.symlink_to(Path("../../../../stolen"))
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(snap)
    assert str(e.value) == (f"index names a file outside the checkpoint folder: {shard.name!r} "
                            f"({snap / 'model.safetensors.index.json'}). The index is unsafe or damaged; re-create it")


# --- a tensor with 0 rows ------------------------------------------------------------------------------

def test_a_tensor_with_zero_rows_in_delta_and_materialize(llama, tmp_path):
    base, reasoner = llama
    add = lambda sd: {**sd, "model.zzz_empty.weight": torch.zeros(0, 128, dtype=torch.bfloat16)}  # noqa: E731
    b, r = _edit(base, tmp_path / "b", add), _edit(reasoner, tmp_path / "r", add)
    res = cli("delta", b, r, "-o", tmp_path / "d.safetensors", "--no-progress")
    assert res.exit_code == 0, res.stderr
    d = load_file(tmp_path / "d.safetensors")
    assert d["model.zzz_empty.weight"].shape == (0, 128)
    for name, src in (("md", ["--delta", tmp_path / "d.safetensors"]), ("mr", ["--reasoner", r])):
        out = tmp_path / name
        res = cli("materialize", b, *src, "-a", "0.5", "-a", "1", "-o", out, "--no-progress",
                  "--max-shard-size", "100KB")
        assert res.exit_code == 0, res.stderr
        merged = state_dict(out / "alpha-0.5")
        assert merged["model.zzz_empty.weight"].shape == (0, 128)
    assert_bit_equal(state_dict(tmp_path / "mr" / "alpha-1"), state_dict(r))


def test_sharded_writer_never_makes_a_shard_it_did_not_fill(tmp_path):
    plan = [("a", torch.float32, (4, 4)), ("b", torch.float32, (4, 4))]
    w = ShardedWriter(folder=tmp_path, plan=plan, metadata={}, max_shard_size=64)
    w.write("a", torch.ones(4, 4))
    with pytest.raises(RuntimeError, match="shard model-00002-of-00002.safetensors was never written"):
        w.close()
    assert not (tmp_path / "model-00002-of-00002.safetensors").exists()


# --- malformed headers: as strict as the safetensors library ---------------------------------------------

def _raw(path: Path, header, data: bytes = b"") -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


DAMAGED = "The file is damaged or was not written as safetensors; re-download or re-create it"
REFUSED = "The file is damaged (safetensors refuses it); re-create it"
F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header, data, expected", [
    ([1, 2], b"", f"corrupt safetensors header (a JSON list, not an object) (P). {DAMAGED}"),
    ({"__metadata__": "x", "a": F32}, bytes(8),
     f"corrupt safetensors header (__metadata__ must map strings to strings) (P). {DAMAGED}"),
    ({"__metadata__": {"k": 1}, "a": F32}, bytes(8),
     f"corrupt safetensors header (__metadata__ must map strings to strings) (P). {DAMAGED}"),
    ({"a": F32, "b": F32}, bytes(8), f"corrupt safetensors header: the data of tensor 'b' overlaps tensor 'a' (P). "
                                     f"{REFUSED}"),
    ({"a": F32, "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, bytes(20),
     f"corrupt safetensors header: the data of tensor 'b' starts 4 bytes after the end of the previous tensor (P). "
     f"{REFUSED}"),
    ({"a": F32}, bytes(12), f"corrupt safetensors file: 4 bytes after the last tensor's data (P). {REFUSED}"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8),
     f"tensor 'a' has a negative dimension in its shape [-2] (P). {DAMAGED}"),
    ({"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 8]}}, bytes(8),
     "tensor 'a' has a byte range that does not match its shape (8 bytes for BF16 [2]) (P). "
     "The file is damaged; re-download it"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8),
     "truncated safetensors file: tensor 'a' ends past the end of the file (86 > 78 bytes) (P). "
     "The download or copy was cut short; re-download it"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8),
     f"corrupt safetensors header entry for tensor 'a' (data_offsets [8, 0] is not [begin, end] with "
     f"0 ≤ begin ≤ end) (P). {DAMAGED}"),
], ids=["list", "metadata-str", "metadata-value-int", "overlap", "gap", "trailing", "negative-shape",
        "dtype-size", "past-eof", "reversed-offsets"])
def test_malformed_headers_are_refused_like_safetensors_does(tmp_path, header, data, expected):
    path = _raw(tmp_path / "x.safetensors", header, data)
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(path)
    assert str(e.value) == expected.replace("(P)", f"({path})")
    with pytest.raises(Exception):  # the reference implementation refuses the same file
        with safe_open(str(path), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]


def test_string_metadata_in_a_delta_is_one_line_on_the_cli(llama, tmp_path):
    base, _ = llama
    bad = _raw(tmp_path / "d.safetensors", {"__metadata__": "delta", "a": F32}, bytes(8))
    r = cli("materialize", base, "--delta", bad, "-a", "0.5", "-o", tmp_path / "out")
    assert_one_line_error(r, f"corrupt safetensors header (__metadata__ must map strings to strings) ({bad}). "
                             f"{DAMAGED}")


def test_weight_map_that_is_a_list(llama, tmp_path):
    base, reasoner = llama
    b = tmp_path / "b"
    shutil.copytree(base, b)
    idx = b / "model.safetensors.index.json"
    idx.write_text(json.dumps({"metadata": {}, "weight_map": ["model-00001-of-00002.safetensors"]}))
    r = cli("delta", b, reasoner, "-o", tmp_path / "d.safetensors")
    assert_one_line_error(r, f"malformed index (weight_map is a JSON list, not a map from tensor names to shard "
                             f"file names) ({idx}). The index is damaged; re-download or re-create it")


# --- one writer per output -----------------------------------------------------------------------------


def test_a_second_materialize_into_the_same_output_is_refused(llama, tmp_path):
    base, reasoner = llama
    out = tmp_path / "out"
    holder = hold_lock(out)
    try:
        r = cli("materialize", base, "--reasoner", reasoner, "-a", "0.5", "-o", out, "--no-progress")
        assert_one_line_error(r, f"another tvtool run (pid {holder.pid}) is writing this output ({out}). "
                                 "Wait for it to finish (or stop it), or choose another output")
        assert not (out / "alpha-0.5").exists() and not (out / "alpha-0.5.partial").exists()
    finally:
        holder.stdin.close()
        holder.wait()
    assert not lock_path(out).exists()
    r = cli("materialize", base, "--reasoner", reasoner, "-a", "0.5", "-o", out, "--no-progress")
    assert r.exit_code == 0, r.stderr


def test_two_materialize_processes_at_once_one_refuses_and_the_output_is_whole(llama, tmp_path):
    base, reasoner = llama
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tvtool", "materialize", str(base), "--reasoner", str(reasoner), "-a", "0.5",
           "-o", str(out), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with output_lock(out):  # both start while the output is held, so they truly overlap after release
        procs = [subprocess.Popen(cmd + ["--dtype", dt], env=env, stderr=subprocess.PIPE, text=True)
                 for dt in ("float32", "bfloat16")]
        time.sleep(0.5)
    results = [(p.wait(), p.stderr.read()) for p in procs]
    refused = [e for rc, e in results if rc != 0]
    assert all("is writing this output" in e or "other inputs or options" in e for e in refused)
    ok = tvtool.materialize(source=DeltaSource(base=base, reasoner=reasoner), output=tmp_path / "ref",
                            options=MaterializeOptions(alphas=(0.5,), dtype=json.loads(
                                (out / "alpha-0.5" / "tvtool.json").read_text())["settings"]["dtype"],
                                progress=False))
    assert_bit_equal(state_dict(out / "alpha-0.5"), state_dict(ok.folders[0.5]))


def test_a_second_eval_into_the_same_folder_is_refused_before_the_engine_starts(tmp_path):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        r = cli("eval", "--model", TOY / "base", "--dataset", "toy", "--limit", "2", "-o", out)
        assert_one_line_error(r, f"another tvtool run (pid {holder.pid}) is writing this output ({out}). "
                                 "Wait for it to finish (or stop it), or choose another output")
    finally:
        holder.stdin.close()
        holder.wait()


# --- outputs apart from inputs -------------------------------------------------------------------------

APART = "Write the output somewhere outside every input"


def test_delta_into_the_base_is_refused(llama, tmp_path):
    base, reasoner = llama
    b = tmp_path / "b"
    shutil.copytree(base, b)
    before = _tree_bytes(b)
    r = cli("delta", b, reasoner, "-o", b, "--overwrite")
    assert_one_line_error(r, f"the output is the input {b} (-o {b}). {APART}")
    assert _tree_bytes(b) == before


def test_delta_file_inside_an_unindexed_base_folder_is_refused(tmp_path):
    b = tmp_path / "b"
    shutil.copytree(TOY / "base", b)
    out = b / "delta.safetensors"
    r = cli("delta", b, TOY / "reasoner", "-o", out)
    assert_one_line_error(r, f"the output is inside the input {b} (-o {out}). {APART}")
    assert not out.exists() and Checkpoint.open(b).names()


def test_materialize_over_the_base_by_name_template_is_refused(tmp_path):
    parent = tmp_path / "models"
    b = parent / "base"
    shutil.copytree(TOY / "base", b)
    before = _tree_bytes(b)
    r = cli("materialize", b, "--reasoner", TOY / "reasoner", "-a", "0.5", "-o", parent, "--name-template", "base",
            "--overwrite")
    assert_one_line_error(r, f"the output is the input {b} (-o/--name-template {b}). {APART}")
    assert _tree_bytes(b) == before


def test_name_template_leaving_the_output_folder_is_refused(tmp_path):
    out = tmp_path / "a" / "b"
    r = cli("materialize", TOY / "base", "--reasoner", TOY / "reasoner", "-a", "0.5", "-o", out,
            "--name-template", "../../x-{alpha}")
    assert_one_line_error(r, f"the folder name leaves the output folder: {out / '../../x-0.5'} "
                             "(--name-template ../../x-{alpha}). Use a plain folder name such as alpha-{alpha} "
                             "(no '..' or absolute paths)")
    assert not (tmp_path / "x-0.5").exists()


def test_eval_into_an_input_folder_is_refused(tmp_path):
    r = cli("eval", "--model", TOY / "base", "--dataset", "toy", "-o", TOY / "base" / "runs")
    assert_one_line_error(r, f"the output is inside the input {TOY / 'base'} (-o {TOY / 'base' / 'runs'}). {APART}")
    assert not (TOY / "base" / "runs").exists()


# --- non-finite values -----------------------------------------------------------------------------------

NAN_AT = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture
def nan_base(llama, tmp_path):
    base, _ = llama

    def poison(sd):
        t = sd[NAN_AT].clone()
        t[3, 5] = float("nan")
        t[7, 1] = float("inf")
        return {**sd, NAN_AT: t}

    return _edit(base, tmp_path / "nan-base", poison)


def test_nan_in_a_checkpoint_is_an_error_naming_tensor_and_index(llama, nan_base, tmp_path):
    _, reasoner = llama
    out = tmp_path / "d.safetensors"
    r = cli("delta", nan_base, reasoner, "-o", out, "--no-progress")
    assert_one_line_error(r, f"non-finite value nan in Δ of tensor {NAN_AT!r} at index (3, 5) "
                             f"({nan_base} → {reasoner}). Fix or re-download the checkpoint, or pass --allow-nonfinite "
                             "to keep them (with a warning)")
    assert not out.exists()
    r = cli("materialize", nan_base, "--reasoner", reasoner, "-a", "0.5", "-o", tmp_path / "m", "--no-progress")
    assert_one_line_error(r, f"non-finite value nan in the base of tensor {NAN_AT!r} at index (3, 5) "
                             f"({nan_base}). Fix or re-download the checkpoint, or pass --allow-nonfinite to keep "
                             "them (with a warning)")
    assert not (tmp_path / "m" / "alpha-0.5").exists()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear"])
def test_nan_in_chunked_fused_passes_is_the_same_error(llama, nan_base, tmp_path, monkeypatch, method):
    """Chunks of a plain pair skip the float32 Δ (fused kernels count NaN/Inf); a bad value still gets the checked
    path's error, naming the tensor and the first index, whatever the operator."""
    import tvtool
    import tvtool.merge.stream
    from tvtool.errors import CheckpointError
    from tvtool.io.safetensors_io import row_chunks

    _, reasoner = llama
    monkeypatch.setattr(tvtool.merge.stream, "row_chunks", lambda shape, max_elems=64: row_chunks(shape, 64))
    cfg = tvtool.MergeConfig(0.5, method=method, density=0.5 if method == "ties" else 1.0,
                             p=0.3 if method == "dare_linear" else 0.0)
    with pytest.raises(CheckpointError) as e:
        tvtool.materialize(source=DeltaSource(base=nan_base, reasoner=reasoner), output=tmp_path / "m", configs=[cfg],
                           options=tvtool.MaterializeOptions(progress=False))
    assert str(e.value).startswith(f"non-finite value nan in the base of tensor {NAN_AT!r} at index (3, 5)")


def test_allow_nonfinite_keeps_them_with_a_warning(llama, nan_base, tmp_path):
    _, reasoner = llama
    out = tmp_path / "d.safetensors"
    r = cli("delta", nan_base, reasoner, "-o", out, "--allow-nonfinite", "--no-progress")
    assert r.exit_code == 0
    assert r.stderr.strip() == f"tvtool: warning: kept 2 non-finite values in Δ of 1 tensors ({NAN_AT}: 2)"
    d = load_file(out)[NAN_AT]
    assert d[3, 5].isnan() and d[7, 1].isinf() and int((~d.isfinite()).sum()) == 2
    r = cli("svd-rank", out, "-r", "2", "-o", tmp_path / "f.safetensors", "--no-progress")
    assert_one_line_error(r, f"non-finite value nan in Δ of tensor {NAN_AT!r} at index (3, 5) ({out}). "
                             "Fix or re-download the checkpoint, or pass --allow-nonfinite to keep them (with a warning)")


def test_alpha_so_large_the_merge_overflows_is_an_error(llama, tmp_path):
    base, reasoner = llama
    out = tmp_path / "m"
    r = cli("materialize", base, "--reasoner", reasoner, "-a", "1e300", "-o", out, "--no-progress")
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    first = Checkpoint.open(base).names()[0]
    assert r.stderr.startswith(f"tvtool: error: θ1 + α·Δ in bfloat16 at α=1e+300 overflows in tensor {first!r} "
                               f"(first at index (0, ")
    assert r.stderr.strip().endswith(f"({out / 'alpha-1e+300'}). Use a smaller |α|, or --dtype float32")
    assert not (out / "alpha-1e+300").exists()


def test_nan_alpha_is_refused_by_eval_and_by_recipes(tmp_path):
    r = cli("eval", "--base", TOY / "base", "--reasoner", TOY / "reasoner", "-a", "nan", "--dataset", "toy",
            "-o", tmp_path / "ev")
    assert_one_line_error(r, "α must be a finite number, got nan (--alpha). Pass real numbers such as 0.2,0.6,1")
    recipe = tmp_path / "r.yaml"
    recipe.write_text((ROOT / "recipes" / "toy.yaml").read_text().replace(
        "alphas: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]", "alphas: [0.5, .nan]").replace(
        "../tvtool/assets/toy", str(TOY)))
    r = cli("sweep", recipe, "-o", tmp_path / "sw")
    assert_one_line_error(r, f"field alphas must be finite numbers, got nan ({recipe})")  # the recipe schema


# --- --include / --exclude that select nothing -------------------------------------------------------------

def test_include_matching_nothing_and_exclude_leaving_nothing(tmp_path):
    args = ["materialize", TOY / "base", "--reasoner", TOY / "reasoner", "-a", "0.5", "-o", tmp_path / "m"]
    names = tvtool.TaskVector.between(TOY / "base", TOY / "reasoner").names()
    hint = ", ".join(repr(n) for n in names[:4])
    r = cli(*args, "--include", "q_prj")
    assert_one_line_error(r, f"--include matches no tensor of the delta ({len(names)} tensors, e.g. {hint}) "
                             "(--include q_prj). Use a regex that matches some of these names")
    r = cli(*args, "--exclude", ".")
    assert_one_line_error(r, f"--exclude leaves no tensor to merge ({len(names)} tensors, e.g. {hint}) "
                             "(--exclude .). Loosen --exclude (or --include) so that some tensors get α·Δ")
    assert not (tmp_path / "m" / "alpha-0.5").exists()


# --- OS errors, and what can be checked before the engine starts ---------------------------------------

def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import tvtool.io.atomic

    out = tmp_path / "d.safetensors"
    partial = out.with_name(out.name + ".partial")
    real, calls = tvtool.io.atomic.discard, []

    def discard_then_fill_the_disk(p):  # atomic_write clears a stale partial first: then the disk is "full"
        real(p)
        if p == partial and not calls:
            calls.append(p)
            partial.symlink_to("/dev/full")  # every write to it fails with ENOSPC, as on a full disk

    monkeypatch.setattr(tvtool.io.atomic, "discard", discard_then_fill_the_disk)
    r = cli("delta", TOY / "base", TOY / "reasoner", "-o", out, "--no-progress")
    assert_one_line_error(r, "no space left on the device [ENOSPC]. Free some space or write the output elsewhere, "
                             "then re-run (partial outputs were removed; finished ones are kept)")
    assert not out.exists() and not partial.exists()


@pytest.mark.parametrize("code, expected", [
    (errno.EROFS, "read-only file system [EROFS] (P). Write the output to a writable location"),
    (errno.EACCES, "permission denied [EACCES] (P). Check the permissions, or choose another output path"),
    (errno.EFBIG, "file too large for this file system [EFBIG] (P). Lower --max-shard-size, or write to a file "
                  "system without a file size limit"),
])
def test_os_errors_are_one_line(tmp_path, monkeypatch, code, expected):
    target = tmp_path / "m" / "alpha-0.5.partial"

    def fail(final):
        raise OSError(code, os.strerror(code), str(target))

    monkeypatch.setattr(sys.modules["tvtool.merge.materialize"], "atomic_dir", fail)
    r = cli("materialize", TOY / "base", "--reasoner", TOY / "reasoner", "-a", "0.5", "-o", tmp_path / "m")
    assert_one_line_error(r, expected.replace("(P)", f"({target})"))


def test_output_path_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = cli("materialize", TOY / "base", "--reasoner", TOY / "reasoner", "-a", "0.5", "-o", f)
    assert_one_line_error(r, f"the output path is a file, not a folder (-o {f}). Give a folder path (or remove the "
                             "file)")
    r = cli("eval", "--model", TOY / "base", "--dataset", "toy", "-o", f)
    assert_one_line_error(r, f"the output path is a file, not a folder (-o {f}). Give a folder path (or remove the "
                             "file)")


@pytest.mark.parametrize("args, expected", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0 (--batch-size)"),
    (["--temperature", "-1"], "bad sampling option temperature=-1.0 (sampling). Need n ≥ 1, max_tokens ≥ 1, "
                              "temperature ≥ 0, 0 < top_p ≤ 1"),
    (["--top-p", "0", "--max-tokens", "0"], "bad sampling option max_tokens=0, top_p=0.0 (sampling). Need n ≥ 1, "
                                            "max_tokens ≥ 1, temperature ≥ 0, 0 < top_p ≤ 1"),
])
def test_eval_options_are_checked_before_the_engine_starts(tmp_path, monkeypatch, args, expected):
    import tvtool.engine.engine

    monkeypatch.setattr(tvtool.engine.engine, "vllm_module", lambda: pytest.fail("the engine was started"))
    r = cli("eval", "--model", TOY / "base", "--dataset", "toy", "-o", tmp_path / "ev", *args)
    assert_one_line_error(r, expected)


def test_unknown_name_template_key(tmp_path):
    r = cli("materialize", TOY / "base", "--reasoner", TOY / "reasoner", "-a", "0.5", "-o", tmp_path / "m",
            "--name-template", "{beta}")
    assert_one_line_error(r, "--name-template has an unknown or malformed field (KeyError: 'beta') ({beta}). "
                             "The only field is {alpha}, e.g. alpha-{alpha}")


# --- misleading messages ---------------------------------------------------------------------------------

def test_offline_push_says_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder = tmp_path / "alpha-0.5"
    shutil.copytree(TOY / "base", folder)
    r = cli("push", folder, "--repo", "alice/x")
    assert_one_line_error(r, f"HF_HUB_OFFLINE is set, so nothing can be pushed ({constants.ENDPOINT}). Unset "
                             "HF_HUB_OFFLINE (or HF_HUB_OFFLINE=0) to push, or give --repo in full with --dry-run")


def test_unwritable_cache_does_not_blame_the_network(tmp_path, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", "/ro/hub/models--org--m")

    monkeypatch.setattr(sys.modules["tvtool.io.checkpoint"], "snapshot_download", denied)
    r = cli("delta", "org/m", "org/r", "-o", tmp_path / "d.safetensors")
    assert_one_line_error(r, "cannot write to the Hugging Face cache: Permission denied (/ro/hub/models--org--m). "
                             "Make the cache writable, or set HF_HOME (or HF_HUB_CACHE) to a writable folder")


def test_int64_tensor_is_recorded_as_int64(llama, tmp_path):
    base, reasoner = llama
    b = _edit(base, tmp_path / "b", lambda sd: {**sd, "model.ids": torch.zeros(4, dtype=torch.bfloat16)})
    r = _edit(reasoner, tmp_path / "r", lambda sd: {**sd, "model.ids": torch.arange(4)})
    res = tvtool.delta(base=b, reasoner=r, output=tmp_path / "d.safetensors", options=DeltaOptions(progress=False))
    assert res.skipped == [{"name": "model.ids", "reason": "non-float dtype (int64 in the reasoner, bfloat16 in "
                                                           "the base)"}]


# --- push: links out of the folder, and what a dry run makes public ------------------------------------

def test_push_refuses_links_leaving_the_folder(tmp_path):
    folder = tmp_path / "alpha-0.5"
    shutil.copytree(TOY / "base", folder)
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    (folder / "notes.txt").symlink_to(secret)
    r = cli("push", folder, "--repo", "alice/x", "--dry-run")
    assert_one_line_error(r, f"the folder to push has a link that leads out of it: notes.txt -> {secret} ({folder}). "
                             "Replace the link by the file itself, or remove it")


def test_dry_run_says_what_becomes_public(tmp_path):
    folder = tmp_path / "alpha-0.5"
    shutil.copytree(TOY / "base", folder)
    r = cli("push", folder, "--repo", "alice/x", "--dry-run")  # private by default
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines()[0].endswith(", PRIVATE (a new repo is created private; an existing public repo is "
                                             "refused)")
    r = cli("push", folder, "--repo", "alice/x", "--dry-run", "--public")
    assert r.exit_code == 0, r.stderr
    head = r.stdout.splitlines()[0]
    assert head.endswith(", PUBLIC: anyone can download these files (a new repo is created public; drop --public "
                         "to keep it private)")


# --- a killed eval leaves no engine process behind -------------------------------------------------------

def _alive(pid: int, start: int) -> bool:
    from tvtool.engine.reaper import _stat

    st = _stat(pid)
    return st is not None and st[1] == start and st[2] != "Z"


@pytest.mark.slow
def test_killed_eval_leaves_no_engine_process(tmp_path):
    pytest.importorskip("vllm")
    from tvtool.engine.reaper import descendants

    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "tvtool", "eval", "--model", str(TOY / "base"), "--dataset", "toy", "--limit", "400",
           "--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--max-tokens", "200",
           "--instruction", "", "--batch-size", "4", "-o", str(tmp_path / "ev")]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # wait until it generates: samples are being written
            seen.update(descendants(p.pid))
            f = tmp_path / "ev" / "samples.jsonl"
            if f.exists() and f.stat().st_size > 0:
                break
            assert p.poll() is None, "eval ended early"
            time.sleep(0.5)
        else:
            pytest.fail("eval did not start generating")
        seen.update(descendants(p.pid))
        assert len(seen) >= 2, seen  # the watchdog and vLLM's EngineCore at least
        p.send_signal(signal.SIGKILL)
        p.wait()
        deadline = time.monotonic() + 30
        while any(_alive(pid, s) for pid, s in seen.items()) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [pid for pid, s in seen.items() if _alive(pid, s)]
        assert not left, f"orphans: {left}"
    finally:
        for pid, s in seen.items():  # only processes this test started (descendants of its eval)
            if _alive(pid, s):
                os.kill(pid, signal.SIGKILL)
        if p.poll() is None:
            p.kill()


# --- one rule for finished work: options + inputs' content, written last ----------------------------------

def _recipe(path: Path, **low_rank) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "name": "t", "base": str(TOY / "base"), "reasoner": str(TOY / "reasoner"), "alphas": [0.5],
        "apply": "swap", "datasets": [{"name": "toy", "limit": 2}], "prompt": {"instruction": ""},
        "sampling": {"max_tokens": 8}, "low_rank": low_rank}))
    return path


def test_sweep_edited_rank_redoes_low_rank_and_its_runs_and_a_moved_folder_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.modules["tvtool.sweep.stages.evaluate"], "Engine", _FakeEngine)
    from tvtool.sweep.run import SweepOptions, sweep
    _FakeEngine.made.clear()  # engines other tests made

    out = tmp_path / "sweep"
    opts = SweepOptions(output=str(out), progress=False)
    run_folder = out / "eval" / "alpha-0.5" / "toy"

    def generated() -> int:
        n = sum(len(e.generated) for e in _FakeEngine.made)
        _FakeEngine.made.clear()
        return n

    sweep(recipe=_recipe(tmp_path / "r.yaml", rank=2), options=opts)
    assert generated() == 2
    report = json.loads((out / "lowrank" / "delta.lowrank.json").read_text())
    assert report["options"]["rank"] == 2 and {t["rank"] for t in report["tensors"] if t["rank"]} == {2}
    capsys.readouterr()

    sweep(recipe=_recipe(tmp_path / "r.yaml", rank=32), options=opts)  # edited: rank 2 → 32
    err = capsys.readouterr().err
    assert "tvtool: rank 2 → 32: redoing svd-rank delta.safetensors" in err
    assert "delta changed: redoing eval alpha-0.5/toy" in err
    assert generated() == 2  # both samples generated again, with the rank-32 Δ
    report = json.loads((out / "lowrank" / "delta.lowrank.json").read_text())
    assert {t["rank"] for t in report["tensors"] if t["rank"]} == {32}
    run = json.loads((run_folder / "run.json").read_text())
    factored = tvtool.io.fingerprint.input_fingerprint(out / "lowrank" / "delta.safetensors")
    assert run["record"]["inputs"]["delta"] == factored
    assert "REPORT.md" in os.listdir(out) and "rank-32" in (out / "REPORT.md").read_text()

    sweep(recipe=_recipe(tmp_path / "r.yaml", rank=32), options=opts)  # unchanged: nothing redone
    assert generated() == 0 and "redoing" not in capsys.readouterr().err

    moved = tmp_path / "elsewhere" / "sweep"
    moved.parent.mkdir()
    shutil.move(out, moved)  # a moved (or copied) sweep folder resumes: fingerprints, not paths
    sweep(recipe=_recipe(tmp_path / "r.yaml", rank=32), options=replace_output(opts, moved))
    assert generated() == 0 and "redoing" not in capsys.readouterr().err
    assert str(tmp_path) not in (moved / "REPORT.md").read_text()  # inputs named relative to the recipe

    sweep(recipe=_recipe(tmp_path / "r.yaml", rank=32, include="mlp"), options=replace_output(opts, moved))
    assert "include null → mlp: redoing svd-rank" in capsys.readouterr().err and generated() == 2


def replace_output(opts, out: Path):
    from dataclasses import replace

    return replace(opts, output=str(out))


def test_delta_rewritten_at_the_same_path_redoes_materialize(tmp_path):
    d = tmp_path / "d.safetensors"
    assert cli("delta", TOY / "base", TOY / "reasoner", "-o", d, "--no-progress").exit_code == 0
    args = ["materialize", TOY / "base", "--delta", d, "-a", "0.5", "-o", tmp_path / "m", "--no-progress"]
    assert cli(*args).exit_code == 0
    r2 = tmp_path / "r2"
    _edit(TOY / "reasoner", r2, lambda sd: {k: (v * 1.5 if v.is_floating_point() else v) for k, v in sd.items()})
    r = cli("delta", TOY / "base", r2, "-o", d, "--no-progress")  # same path, other inputs: not "finished"
    assert_one_line_error(r, f"the output holds a result made from other inputs or options (reasoner changed) ({d}). "
                             "Pass --overwrite to redo it, or choose another output")
    assert cli("delta", TOY / "base", r2, "-o", d, "--overwrite", "--no-progress").exit_code == 0
    r = cli(*args)
    assert_one_line_error(r, f"the output holds a result made from other inputs or options (delta changed) "
                             f"({tmp_path / 'm' / 'alpha-0.5'}). Pass --overwrite to redo it, or choose another output")
    r = cli(*args, "--overwrite")
    assert r.exit_code == 0 and "already complete" not in r.stdout
    assert "tvtool: delta changed: redoing materialize alpha-0.5" in r.stderr
    fresh = tvtool.materialize(source=DeltaSource(base=TOY / "base", delta=d), output=tmp_path / "fresh",
                               options=MaterializeOptions(alphas=(0.5,), progress=False))
    assert_bit_equal(state_dict(tmp_path / "m" / "alpha-0.5"), state_dict(fresh.folders[0.5]))
    assert cli(*args).stdout.strip().endswith("(already complete)")  # unchanged: finished


@pytest.mark.parametrize("change", [{"dtype": "bfloat16"}, {"max_model_len": 128}])
def test_changed_engine_dtype_or_max_model_len_redoes_the_eval_run(tmp_path, capsys, change):
    from dataclasses import replace as dc_replace

    from tvtool.engine.options import EngineOptions
    from tvtool.errors import OutputError
    from tvtool.evaluation.evaluate import evaluate
    from tvtool.evaluation.runs import EvalOptions

    out = tmp_path / "ev"
    kw = dict(output=out, source=DeltaSource(base=TOY / "base", reasoner=TOY / "reasoner"), alphas=[0.5],
              options=EvalOptions(dataset="toy", limit=2, progress=False))
    e1 = _FakeEngine(EngineOptions(dtype="float32", max_model_len=256))
    evaluate(engine=e1, **kw)
    assert len(e1.generated) == 2
    e2 = _FakeEngine(dc_replace(e1.options, **change))
    with pytest.raises(OutputError, match="other settings or inputs"):
        evaluate(engine=e2, **kw)
    capsys.readouterr()
    evaluate(engine=e2, **{**kw, "options": dc_replace(kw["options"], overwrite=True)})
    (k, v), = change.items()
    assert len(e2.generated) == 2
    before = {"dtype": "float32", "max_model_len": 256}[k]
    assert f"tvtool: engine.{k} {before} → {v}: redoing eval alpha-0.5/toy" in capsys.readouterr().err
    e3 = _FakeEngine(e2.options)
    evaluate(engine=e3, **kw)  # unchanged: finished
    assert e3.generated == []


def test_changed_include_redoes_the_swept_eval_run(tmp_path):
    from dataclasses import replace as dc_replace

    from tvtool.evaluation.evaluate import evaluate
    from tvtool.evaluation.runs import EvalOptions

    kw = dict(output=tmp_path / "ev", source=DeltaSource(base=TOY / "base", reasoner=TOY / "reasoner"), alphas=[0.5])
    o = EvalOptions(dataset="toy", limit=2, progress=False, overwrite=True)
    e = _FakeEngine(None)
    evaluate(engine=e, options=o, **kw)
    evaluate(engine=e, options=dc_replace(o, include="mlp"), **kw)
    evaluate(engine=e, options=dc_replace(o, include="mlp", exclude="up_proj"), **kw)
    evaluate(engine=e, options=dc_replace(o, include="mlp", exclude="up_proj"), **kw)
    assert len(e.generated) == 6
