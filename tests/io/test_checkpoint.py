"""Reading checkpoints: every layout, Hub ids through the cache, and each kind of bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import tvtool
from helpers import assert_bit_equal, assert_one_line_error, cli, cli_subprocess
from tiny import state_dict
from tvtool import Checkpoint, DeltaOptions
from tvtool.errors import CheckpointError
from tvtool.vectors.source import DeltaSource


def test_reads_what_safetensors_reads(llama):
    base, _ = llama
    ck = Checkpoint.open(base)
    ref = state_dict(base)
    assert sorted(ck.names()) == sorted(ref)
    assert_bit_equal(dict(ck.iter_tensors()), ref)
    n = "model.embed_tokens.weight"
    assert torch.equal(ck.read(n, 10, 37), ref[n][10:37])


def test_reads_every_dtype_safetensors_writes(tmp_path):
    """The dtype table covers safetensors.torch's: each dtype reads back bit for bit, rows included."""
    from safetensors.torch import save_file

    from tvtool.io.safetensors_io import DTYPES, read_rows

    g = torch.Generator().manual_seed(0)
    sd = {}
    for code, dt in DTYPES.items():
        x = torch.randint(0, 2 if dt == torch.bool else 100, (6, 5), generator=g)
        sd[code] = x.to(dt) if not dt.is_complex else torch.complex(x.float(), -x.float())
    save_file(sd, tmp_path / "model.safetensors")
    ck = Checkpoint.open(tmp_path)
    stored = dict(ck.iter_stored())
    for code, t in sd.items():
        assert ck.info(code).dtype == t.dtype
        assert torch.equal(read_rows(ck.info(code)).view(torch.uint8), t.view(torch.uint8)), code
        assert torch.equal(read_rows(ck.info(code), 2, 5).view(torch.uint8), t[2:5].view(torch.uint8)), code
        assert torch.equal(stored[code].view(torch.uint8), t.view(torch.uint8)), code
        if code.startswith("F8"):  # fp8 without block scales: never read as weights (tvtool.io.fp8)
            with pytest.raises(CheckpointError, match=f"tensor '{code}' is float8"):
                ck.read(code)
        else:
            assert torch.equal(ck.read(code, 2, 5).view(torch.uint8), t[2:5].view(torch.uint8)), code


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _shard(folder):
    return sorted(folder.glob("model-*.safetensors"))[1]


def _delta_fails(base, reasoner, tmp_path, expected):
    out = tmp_path / "out.safetensors"
    r = cli("delta", base, reasoner, "-o", out)
    assert_one_line_error(r, expected)
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_truncated_shard(llama, tmp_path):
    base, reasoner = llama
    b = _copy(base, tmp_path / "b")
    shard = _shard(b)
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    r = cli("delta", b, reasoner, "-o", tmp_path / "out.safetensors")
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("tvtool: error: truncated safetensors file: tensor ")
    assert r.stderr.strip().endswith(f"bytes) ({shard}). The download or copy was cut short; re-download it")
    assert not (tmp_path / "out.safetensors").exists()


def test_corrupt_header(llama, tmp_path):
    base, reasoner = llama
    b = _copy(base, tmp_path / "b")
    shard = _shard(b)
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json!!!!"
    shard.write_bytes(bytes(data))
    _delta_fails(b, reasoner, tmp_path, f"corrupt safetensors header (not JSON) ({shard}). "
                                        "The file is damaged; re-download it")


def test_index_names_missing_file(llama, tmp_path):
    base, reasoner = llama
    b = _copy(base, tmp_path / "b")
    shard = _shard(b)
    shard.unlink()
    _delta_fails(b, reasoner, tmp_path, f"index names a missing shard file {shard.name!r} "
                                        f"({b / 'model.safetensors.index.json'}). "
                                        "The download is incomplete; fetch the missing shard")


def test_index_escaping_the_folder(llama, tmp_path):
    base, reasoner = llama
    b = _copy(base, tmp_path / "b")
    idx = b / "model.safetensors.index.json"
    j = json.loads(idx.read_text())
    first = next(iter(j["weight_map"]))
    j["weight_map"][first] = "../secrets.safetensors"
    idx.write_text(json.dumps(j))
    _delta_fails(b, reasoner, tmp_path, f"index names a file outside the checkpoint folder: "
                                        f"'../secrets.safetensors' ({idx}). The index is unsafe or damaged; re-create it")


def test_missing_checkpoint_path(llama, tmp_path):
    _, reasoner = llama
    _delta_fails(tmp_path / "nope", reasoner, tmp_path, f"checkpoint not found ({tmp_path / 'nope'}). Give a model "
                                                        "folder, a .safetensors file or a Hub id like org/name[@revision]")


def test_folder_without_weights(llama, tmp_path):
    _, reasoner = llama
    (tmp_path / "empty").mkdir()
    _delta_fails(tmp_path / "empty", reasoner, tmp_path, f"no weights found (no *.safetensors file) "
                                                         f"({tmp_path / 'empty'}). Point at a model folder with "
                                                         "model.safetensors or an index")


def test_pickle_refused_unless_allowed(llama, tmp_path):
    base, reasoner = llama
    b = tmp_path / "bin"
    b.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / f, b / f)
    torch.save(state_dict(base), b / "pytorch_model.bin")
    _delta_fails(b, reasoner, tmp_path, f"pickle checkpoint (*.bin) refused: loading pickle can run arbitrary code "
                                        f"({b}). Convert it to safetensors, or pass --allow-pickle to load it with "
                                        "torch.load(weights_only=True)")
    out1, out2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert cli("delta", b, reasoner, "-o", out1, "--allow-pickle", "--no-progress").exit_code == 0
    tvtool.delta(base=base, reasoner=reasoner, output=out2, options=DeltaOptions(progress=False))
    assert_bit_equal(load_file(out1), load_file(out2))


def test_error_is_one_line_without_traceback_in_a_real_process(llama, tmp_path):
    _, reasoner = llama
    p = cli_subprocess("delta", tmp_path / "nope", reasoner, "-o", tmp_path / "x.safetensors")
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"tvtool: error: checkpoint not found ({tmp_path / 'nope'}). Give a "
                                             "model folder, a .safetensors file or a Hub id like org/name[@revision]"]


@pytest.fixture
def hub_cache(llama, monkeypatch):
    """A pre-populated Hugging Face cache holding the tiny pair as tiny-org/base and tiny-org/reasoner."""
    import os
    from pathlib import Path

    from huggingface_hub import constants

    cache = Path(os.environ["HF_HOME"]) / "hub"
    revs = {}
    for name, src in zip(("base", "reasoner"), llama):
        sha = ("a" if name == "base" else "b") * 40
        repo = cache / f"models--tiny-org--{name}"
        shutil.copytree(src, repo / "snapshots" / sha, dirs_exist_ok=True)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(sha)
        revs[name] = sha
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return revs


def test_hub_ids_resolve_from_the_cache_offline(llama, hub_cache, tmp_path):
    base, reasoner = llama
    out = tmp_path / "d.safetensors"
    r = cli("delta", "tiny-org/base", f"tiny-org/reasoner@{hub_cache['reasoner']}", "-o", out, "--no-progress")
    assert r.exit_code == 0, r.stderr
    ref = tmp_path / "ref.safetensors"
    tvtool.delta(base=base, reasoner=reasoner, output=ref, options=DeltaOptions(progress=False))
    assert_bit_equal(load_file(out), load_file(ref))
    prov = tvtool.TaskVector.load(out).provenance()
    assert prov["base"] == {"source": "tiny-org/base", "repo_id": "tiny-org/base", "revision": hub_cache["base"]}
    assert prov["reasoner"]["revision"] == hub_cache["reasoner"]
    res = tvtool.materialize(source=DeltaSource(base="tiny-org/base", reasoner="tiny-org/reasoner"),
                             output=tmp_path / "m",
                             options=tvtool.MaterializeOptions(alphas=(0.5,), progress=False))
    from huggingface_hub import ModelCard

    card = ModelCard.load(res.folders[0.5] / "README.md")
    assert card.data.base_model == ["tiny-org/base", "tiny-org/reasoner"]
    assert card.data.base_model_relation == "merge"


def test_hub_id_not_cached_offline(hub_cache, tmp_path):
    r = cli("delta", "tiny-org/base", "tiny-org/absent", "-o", tmp_path / "d.safetensors")
    assert_one_line_error(r, "not in the local Hugging Face cache and the Hub cannot be reached (tiny-org/absent). "
                             "Download it on a machine with a network (or unset HF_HUB_OFFLINE), or pass a local folder")
