"""tvtool.io.hub against tests/hubserver.py, through the real huggingface_hub client.

The server runs in a subprocess on the loopback port conftest.py picked; every test
uses its own repo names, so tests share one server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import traceback
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from huggingface_hub import DatasetCard, HfApi, ModelCard, ModelCardData, hf_hub_download, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError
from safetensors.torch import save_file

from helpers import cli
from tvtool.errors import CheckpointError, HubError, OptionsError
from tvtool.io.hub import PushOptions, push

from hub_fixture import ALICE, BOB, ENDPOINT, RETRY, WRONG


@pytest.fixture
def alice():
    return HfApi(endpoint=ENDPOINT, token=ALICE)


def make_alpha(path: Path, *, alpha: float = 0.6, base: str = "org/base-7b", reasoner: str = "org/reasoner-7b",
               readme: bool = True, seed: int = 0) -> Path:
    """A fake materialized α folder laid out like tvtool.merge.materialize writes it: two safetensors
    shards (one > 1 MiB) + index, config.json, tvtool.json and a ModelCard README."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"a": torch.randn(320, 1024, generator=g)}, str(path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.randn(8, 8, generator=g)}, str(path / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 1024}))
    settings = {"alpha": alpha, "base": {"source": base, "repo_id": base, "revision": None}, "reasoner": reasoner}
    (path / "tvtool.json").write_text(json.dumps({"tvtool_version": "0.1.0", "settings": settings}))
    if readme:
        data = ModelCardData(library_name="transformers", tags=["tvtool", "merge"], base_model=[base, reasoner],
                             base_model_relation="merge", tvtool={"alpha": alpha})
        ModelCard(f"---\n{data.to_yaml()}\n---\n\n# Merge alpha={alpha}\n\nWritten by tvtool.\n").save(path / "README.md")
    return path


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and ".cache" not in p.parts}


def head(api: HfApi, repo_id: str, branch: str = "main", repo_type: str = "model") -> str:
    refs = api.list_repo_refs(repo_id, repo_type=repo_type)
    return next(b.target_commit for b in refs.branches if b.name == branch)


def debug_logs(caplog) -> None:
    """Capture everything at DEBUG, huggingface_hub's own logger (WARNING by default) included."""
    for name in (None, "huggingface_hub", "tvtool"):
        caplog.set_level(logging.DEBUG, logger=name)


def pushed_card(repo_id: str, tmp_path: Path, *, revision: str = "main", repo_type: str = "model") -> ModelCard:
    path = hf_hub_download(repo_id, "README.md", revision=revision, repo_type=repo_type, token=ALICE,
                           local_dir=tmp_path / f"card-{repo_id.replace('/', '-')}-{revision}")
    return (DatasetCard if repo_type == "dataset" else ModelCard).load(path)


def test_push_round_trips_bytes_and_sends_large_files_through_lfs(hub, alice, tmp_path):
    folder = make_alpha(tmp_path / "out" / "alpha-0.6")
    before = hub.stats().get("PUT /_lfs/upload/*", 0)
    result = push(folder=folder, options=PushOptions(repo="alice/roundtrip"), token=ALICE)
    (r,) = result.repos
    assert (r.repo_id, r.revision, r.new_commit) == ("alice/roundtrip", "main", True)
    assert r.commit == head(alice, "alice/roundtrip")
    # Both shards are binary -> LFS (one PUT each); json files are regular git blobs.
    assert hub.stats()["PUT /_lfs/upload/*"] - before == 2
    info = {f.path: f for f in alice.get_paths_info("alice/roundtrip", list(local_files(folder)))}
    big = (folder / "model-00001-of-00002.safetensors").read_bytes()
    assert len(big) > 1024 * 1024
    assert info["model-00001-of-00002.safetensors"].lfs.sha256 == hashlib.sha256(big).hexdigest()
    assert info["config.json"].lfs is None
    out = Path(snapshot_download("alice/roundtrip", local_dir=tmp_path / "dl", token=ALICE))
    assert local_files(out) == local_files(folder) | {".gitattributes": (out / ".gitattributes").read_bytes()}
    assert ALICE not in (out / "README.md").read_text()


def test_generated_card_metadata_parses(hub, alice, tmp_path):
    folder = make_alpha(tmp_path / "run7" / "alpha-0.25", alpha=0.25, readme=False)
    (r,) = push(folder=folder, token=ALICE).repos
    assert r.repo_id == "alice/run7-alpha0.25"  # default template: {user}/{name}-alpha{alpha}
    card = pushed_card(r.repo_id, tmp_path)
    assert card.data.base_model == ["org/base-7b", "org/reasoner-7b"]
    assert card.data.base_model_relation == "merge"
    assert card.data.library_name == "transformers"
    assert "tvtool" in card.data.tags
    assert "α = 0.25" in card.text and ALICE not in str(card)


def test_evaluation_summary_is_embedded_in_card(hub, tmp_path):
    folder = make_alpha(tmp_path / "ev" / "alpha-1.0", alpha=1.0)
    (folder / "README.md").write_text(ModelCard.load(folder / "README.md").content
                                      + "\n## Evaluation\n\nstale numbers\n\n## License\n\nMIT\n")
    table = "| task | acc |\n|---|---|\n| gsm8k | 0.71 |"
    (folder / "summary.md").write_text(table + "\n")
    (r,) = push(folder=folder, options=PushOptions(repo="alice/with-eval"), token=ALICE).repos
    card = pushed_card(r.repo_id, tmp_path)
    assert f"## Evaluation\n\n{table}\n\n## License\n\nMIT\n" in card.text
    assert "stale numbers" not in card.text
    assert card.data.base_model == ["org/base-7b", "org/reasoner-7b"]  # the folder's own metadata is kept
    newer = tmp_path / "newer.md"
    newer.write_text("| task | acc |\n|---|---|\n| gsm8k | 0.74 |\n")
    again = push(folder=folder, options=PushOptions(repo="alice/with-eval", eval_summary=str(newer)), token=ALICE)
    text = pushed_card(r.repo_id, tmp_path / "again").text
    assert again.repos[0].new_commit and "| gsm8k | 0.74 |" in text and "0.71" not in text
    assert text.count("## Evaluation") == 1


def test_sweep_pushes_one_repo_per_alpha(hub, alice, tmp_path):
    sweep = tmp_path / "gsm"
    for i, a in enumerate((0.2, 0.6)):
        make_alpha(sweep / f"alpha-{a}", alpha=a, seed=i)
    (sweep / "alpha-0.6" / "summary.md").write_text("| acc |\n|---|\n| 0.5 |\n")
    result = push(folder=sweep, token=ALICE)
    assert [r.repo_id for r in result.repos] == ["alice/gsm-alpha0.2", "alice/gsm-alpha0.6"]
    for r in result.repos:
        remote = hf_hub_download(r.repo_id, "model-00001-of-00002.safetensors", token=ALICE)
        assert Path(remote).read_bytes() == (r.folder / "model-00001-of-00002.safetensors").read_bytes()
    assert "## Evaluation" not in pushed_card("alice/gsm-alpha0.2", tmp_path).text
    assert "| 0.5 |" in pushed_card("alice/gsm-alpha0.6", tmp_path).text


def test_alpha_and_name_for_a_folder_not_named_alpha(hub, tmp_path):
    folder = make_alpha(tmp_path / "merged", alpha=1.0, readme=False)
    (r,) = push(folder=folder, options=PushOptions(dry_run=True), token=ALICE).repos
    assert r.repo_id == "alice/merged-alpha1"  # α from tvtool.json, formatted as materialize names folders
    with pytest.raises(OptionsError) as err:
        push(folder=folder, options=PushOptions(repo="{user}/{nme}", dry_run=True), token=ALICE)
    assert str(err.value) == "Bad repo template (--repo {user}/{nme}). Use only the fields {user}, {name} and {alpha}"


def test_sweep_template_without_alpha_is_refused(hub, tmp_path):
    for a in (0.2, 0.6):
        make_alpha(tmp_path / "s" / f"alpha-{a}", alpha=a)
    with pytest.raises(OptionsError) as err:
        push(folder=tmp_path / "s", options=PushOptions(repo="alice/one-repo", dry_run=True), token=ALICE)
    assert str(err.value) == "Several folders map to the same repo (--repo alice/one-repo). Put {alpha} in the repo template"


def test_lora_adapter_card(hub, tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    save_file({"lora_A": torch.zeros(4, 16)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base-7b", "r": 4}))
    (r,) = push(folder=folder, options=PushOptions(repo="{user}/my-lora"), token=ALICE).repos
    card = pushed_card(r.repo_id, tmp_path)
    assert (card.data.library_name, card.data.base_model, card.data.base_model_relation) == (
        "peft", "org/base-7b", "adapter")


def test_private_repo_is_invisible_to_others(hub, alice, tmp_path):
    folder = make_alpha(tmp_path / "p" / "alpha-0.6")
    push(folder=folder, options=PushOptions(repo="alice/secret"), token=ALICE)  # private by default
    assert alice.repo_info("alice/secret").private is True
    for token in (False, BOB):
        with pytest.raises(RepositoryNotFoundError):
            HfApi(endpoint=ENDPOINT, token=token).repo_info("alice/secret")
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download("alice/secret", "config.json", token=token, local_dir=tmp_path / f"x{token}")


def test_private_push_into_existing_public_repo_is_refused(hub, alice, tmp_path):
    folder = make_alpha(tmp_path / "pub" / "alpha-0.6")
    alice.create_repo("alice/public-one")
    before = head(alice, "alice/public-one")
    with pytest.raises(HubError) as err:
        push(folder=folder, options=PushOptions(repo="alice/public-one"), token=ALICE)
    assert str(err.value) == ("The repository exists and is public, but the push is private (model alice/public-one@main"
                              f" at {ENDPOINT}). Make it private on the Hub first, or pass --public")
    assert head(alice, "alice/public-one") == before


def test_public_flag_creates_a_public_repo(hub, alice, tmp_path, monkeypatch):
    folder = make_alpha(tmp_path / "open" / "alpha-0.6")
    monkeypatch.setenv("HF_TOKEN", ALICE)
    r = cli("push", folder, "--repo", "alice/open", "--public", "--endpoint", ENDPOINT)
    assert r.exit_code == 0, r.output
    assert HfApi(endpoint=ENDPOINT, token=False).repo_info("alice/open").private is False


def test_wrong_token_fails_with_one_clean_line(hub, tmp_path, caplog):
    folder = make_alpha(tmp_path / "w" / "alpha-0.6")
    debug_logs(caplog)
    with pytest.raises(HubError) as err:
        push(folder=folder, options=PushOptions(repo="alice/never"), token=WRONG)
    assert str(err.value) == (f"The Hub rejected the token (HTTP 401) ({ENDPOINT}). "
                              "Set HF_TOKEN or run `hf auth login` with a valid write token")
    assert "whoami-v2" in caplog.text  # the request was logged (at DEBUG), the token was not
    assert WRONG not in "".join(traceback.format_exception(err.value)) and WRONG not in caplog.text


def test_writing_to_another_users_namespace_is_refused(hub, tmp_path, caplog):
    folder = make_alpha(tmp_path / "n" / "alpha-0.6")
    debug_logs(caplog)
    with pytest.raises(HubError) as err:
        push(folder=folder, options=PushOptions(repo="bob/taken"), token=ALICE)
    assert str(err.value) == (f"The token may not create the repository (HTTP 403) (model bob/taken@main at "
                              f"{ENDPOINT}). Use a write token of the repo's owner, or push to your own namespace")
    assert "repos/create" in caplog.text
    assert ALICE not in "".join(traceback.format_exception(err.value)) and ALICE not in caplog.text


def test_token_from_environment(hub, alice, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ALICE)
    (r,) = push(folder=make_alpha(tmp_path / "e" / "alpha-0.6"), options=PushOptions(repo="alice/env")).repos
    assert r.commit == head(alice, "alice/env")


def test_token_from_login(hub, alice, tmp_path, monkeypatch):
    from huggingface_hub import login, logout

    monkeypatch.delenv("HF_TOKEN", raising=False)
    login(token=ALICE, add_to_git_credential=False)
    try:
        (r,) = push(folder=make_alpha(tmp_path / "l" / "alpha-0.6"), options=PushOptions(repo="alice/login")).repos
    finally:
        logout()
    assert r.commit == head(alice, "alice/login")
    with pytest.raises(HubError) as err:  # logged out, no HF_TOKEN: a clear error, before any write
        push(folder=tmp_path / "l" / "alpha-0.6", options=PushOptions(repo="alice/login"))
    assert str(err.value) == f"No Hugging Face token found ({ENDPOINT}). Set HF_TOKEN or run `hf auth login`"


def test_second_identical_push_makes_no_commit(hub, alice, tmp_path):
    folder = make_alpha(tmp_path / "twice" / "alpha-0.6")
    options = PushOptions(repo="alice/twice")
    first = push(folder=folder, options=options, token=ALICE).repos[0]
    n_commits = len(alice.list_repo_commits("alice/twice"))
    second = push(folder=folder, options=options, token=ALICE).repos[0]
    assert (second.new_commit, second.commit) == (False, first.commit)
    assert head(alice, "alice/twice") == first.commit
    assert len(alice.list_repo_commits("alice/twice")) == n_commits == 2  # "initial commit" + ours
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    third = push(folder=folder, options=options, token=ALICE).repos[0]
    assert third.new_commit and alice.list_repo_commits("alice/twice")[0].commit_id == third.commit


def test_push_to_branch_leaves_main_untouched(hub, alice, tmp_path):
    folder = make_alpha(tmp_path / "b" / "alpha-0.6")
    push(folder=folder, options=PushOptions(repo="alice/branchy"), token=ALICE)
    main_before = head(alice, "alice/branchy")
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 4}')
    options = PushOptions(repo="alice/branchy", revision="exp-1", commit_message="try smaller hidden size")
    (r,) = push(folder=folder, options=options, token=ALICE).repos
    assert head(alice, "alice/branchy") == main_before
    assert head(alice, "alice/branchy", "exp-1") == r.commit
    assert alice.list_repo_commits("alice/branchy", revision="exp-1")[0].title == "try smaller hidden size"
    on_branch = hf_hub_download("alice/branchy", "config.json", revision="exp-1", token=ALICE)
    on_main = hf_hub_download("alice/branchy", "config.json", revision="main", token=ALICE)
    assert json.loads(Path(on_branch).read_text())["hidden_size"] == 4
    assert json.loads(Path(on_main).read_text())["hidden_size"] == 1024


def test_dataset_folder_round_trips_through_load_dataset(hub, alice, tmp_path):
    import datasets

    rows = {"question": ["1+1?", "2*3?", "10-4?"], "answer": ["2", "6", "6"]}
    folder = tmp_path / "evalset"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    options = PushOptions(repo="alice/evalset", repo_type="dataset")
    (r,) = push(folder=folder, options=options, token=ALICE).repos
    assert r.repo_type == "dataset"
    out = snapshot_download("alice/evalset", repo_type="dataset", local_dir=tmp_path / "dl", token=ALICE)
    loaded = datasets.load_dataset(out, split="train")
    assert loaded.to_dict() == rows
    assert "tvtool" in pushed_card("alice/evalset", tmp_path, repo_type="dataset").data.tags
    with pytest.raises(RepositoryNotFoundError):
        alice.repo_info("alice/evalset")  # a dataset, not a model


def test_dry_run_writes_nothing(hub, alice, tmp_path):
    folder = make_alpha(tmp_path / "dry" / "alpha-0.6", readme=False)
    before = hub.stats()
    result = push(folder=folder, options=PushOptions(repo="{user}/dry-run", dry_run=True), token=ALICE)
    after = hub.stats()
    (r,) = result.repos
    assert (result.dry_run, r.repo_id, r.commit, r.new_commit) == (True, "alice/dry-run", None, False)
    sizes = dict(r.files)
    assert sizes["model-00001-of-00002.safetensors"] == (folder / "model-00001-of-00002.safetensors").stat().st_size
    assert set(sizes) == set(local_files(folder)) | {"README.md"}
    assert "would push" in result.summary() and "README.md" in result.summary()
    assert {k: v for k, v in after.items() if before.get(k) != v} == {"GET /api/whoami-v2": before.get(
        "GET /api/whoami-v2", 0) + 1}
    assert not alice.repo_exists("alice/dry-run")


def test_unreachable_server_is_one_clean_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    folder = make_alpha(tmp_path / "u" / "alpha-0.6")
    with pytest.raises(HubError) as err:
        push(folder=folder, options=PushOptions(repo="alice/x", endpoint=dead), token=ALICE)
    assert str(err.value) == f"Cannot reach the Hub to check the token ({dead}). Check the network and HF_ENDPOINT, then re-run"
    assert ALICE not in "".join(traceback.format_exception(err.value))


def test_connection_lost_midway_then_rerun_completes(hub, alice, tmp_path):
    folder = make_alpha(tmp_path / "mid" / "alpha-0.6")
    options = PushOptions(repo="alice/midway")
    puts = hub.stats().get("PUT /_lfs/upload/*", 0)
    hub.fault(method="POST", path_contains="/api/models/alice/midway/commit/")
    with pytest.raises(HubError) as err:
        push(folder=folder, options=options, token=ALICE)
    assert str(err.value) == (f"Lost the connection to the Hub trying to upload the files (model alice/midway@main at "
                              f"{ENDPOINT}). Check the network. {RETRY}")
    assert alice.list_repo_files("alice/midway") == [".gitattributes"]  # nothing committed
    assert hub.stats()["PUT /_lfs/upload/*"] - puts == 2  # but the LFS blobs reached the server
    (r,) = push(folder=folder, options=options, token=ALICE).repos
    assert r.new_commit and hub.stats()["PUT /_lfs/upload/*"] - puts == 2  # and were not sent again
    out = Path(snapshot_download("alice/midway", local_dir=tmp_path / "dl", token=ALICE))
    assert local_files(out) == local_files(folder) | {".gitattributes": (out / ".gitattributes").read_bytes()}


def test_refused_lfs_upload_is_one_clean_error_then_rerun_completes(hub, alice, tmp_path):
    folder = make_alpha(tmp_path / "lfsfail" / "alpha-0.6")
    options = PushOptions(repo="alice/lfs-refused")
    hub.fault(method="PUT", path_contains="/_lfs/upload/", status=400, times=2)  # 400: the client does not retry
    with pytest.raises(HubError) as err:
        push(folder=folder, options=options, token=ALICE)
    assert str(err.value) == (f"The Hub failed to upload the files (HTTP 400) (model alice/lfs-refused@main at "
                              f"{ENDPOINT}). {RETRY}")
    assert alice.list_repo_files("alice/lfs-refused") == [".gitattributes"]
    (r,) = push(folder=folder, options=options, token=ALICE).repos
    assert r.new_commit and set(alice.list_repo_files("alice/lfs-refused")) == set(local_files(folder)) | {
        ".gitattributes"}


def test_bad_card_metadata_is_refused_before_any_write(hub, tmp_path):
    folder = make_alpha(tmp_path / "bad" / "alpha-0.6")
    (folder / "README.md").write_text("---\ntags: [unclosed\n---\n# card\n")
    with pytest.raises(CheckpointError) as err:
        push(folder=folder, options=PushOptions(repo="alice/bad-card", dry_run=True), token=ALICE)
    assert str(err.value) == (f"README.md metadata does not parse ({folder / 'README.md'}). "
                              "Fix the YAML block between the '---' lines, or delete README.md")


def test_missing_folder_is_an_options_error(tmp_path):
    with pytest.raises(OptionsError) as err:
        push(folder=tmp_path / "nope", options=replace(PushOptions(), dry_run=True))
    assert str(err.value) == f"Folder to push does not exist ({tmp_path / 'nope'}). Pass a tvtool output folder"
