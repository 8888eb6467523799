"""Push tvtool outputs to the Hugging Face Hub (or any Hub-compatible server).

One verb, `push`: a materialized α folder, a sweep output (a folder of `alpha-*` folders,
one repo each), a LoRA adapter folder, or a dataset folder (repo_type "dataset"). Each
target gets exactly one commit with all its files and a model card; a push whose files
equal the branch head makes no commit, so re-running a push is safe and completes one
that failed midway (LFS files already on the server are not sent again).

The token comes from the argument, HF_TOKEN or the `hf auth login` store (huggingface_hub
resolves it) and is never logged, written to a card or put in an error message.

Metadata read from an α folder (see `_metadata`): α from tvtool.json, the card or the
folder name (`alpha-0.6`); the parent models for a generated card from tvtool.json. An
evaluation table (markdown) comes from the `evaluation` argument, the `eval_summary` option
(a file) or a `summary.md` inside the α folder, and lands in the card under "## Evaluation".
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import re
import string
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Literal

from tvtool.errors import CheckpointError, HubError, OptionsError
from tvtool.io.layout import ALPHA_DIR, is_hub_id
from tvtool.options import CliOptions, opt

log = logging.getLogger(__name__)

SKIP_PARTS = {".git", "__pycache__"}
RETRY_FIX = "Re-run the same push: files already uploaded are not sent again"


@dataclass(frozen=True)
class PushOptions(CliOptions):
    """How and where to push; the CLI derives its flags from these fields."""

    repo: str | None = opt(
        None,
        "Target repo id or template with {user}, {name}, {alpha}; default '{user}/{name}-alpha{alpha}' "
        "('{user}/{name}' when the folder has no alpha).",
    )
    repo_type: Literal["model", "dataset"] = opt("model", "Hub repository type.")
    private: bool = opt(True, "Create new repos as private (the default) and refuse to push into an existing public "
                              "repo; --public creates public repos and pushes into public ones.", off="--public")
    revision: str | None = opt(None, "Branch to push to; created from main if missing. Default: main.")
    commit_message: str | None = opt(None, "Commit message. Default: 'Upload <folder> with tvtool'.")
    eval_summary: str | None = opt(None, "Markdown file with an evaluation table to put in each card.")
    dry_run: bool = opt(False, "List the files, sizes and target repos; write nothing.")
    endpoint: str | None = opt(None, "Hub URL. Default: HF_ENDPOINT or https://huggingface.co.")


@dataclass(frozen=True)
class RepoPush:
    """What was (or, in a dry run, would be) pushed to one repo."""

    folder: Path
    repo_id: str
    repo_type: str
    revision: str
    files: tuple[tuple[str, int], ...]  # (path in repo, size in bytes), README.md as pushed
    commit: str | None = None  # branch head after the push; None in a dry run
    new_commit: bool = False  # False when nothing changed (or dry run)
    visibility: str = ""  # in a dry run: what the push would make visible, in words

    @property
    def size(self) -> int:
        return sum(size for _, size in self.files)


@dataclass(frozen=True)
class PushResult:
    repos: tuple[RepoPush, ...]
    dry_run: bool

    def summary(self) -> str:
        """Human-readable lines: one per repo, then one per file in a dry run."""
        lines = []
        for r in self.repos:
            head = f"{r.repo_type} {r.repo_id}@{r.revision}: {len(r.files)} files, {r.size} bytes"
            if self.dry_run:
                lines.append(f"would push {r.folder} -> {head}, {r.visibility}")
                lines += [f"  {path} ({size} bytes)" for path, size in r.files]
            else:
                state = f"new commit {r.commit}" if r.new_commit else f"unchanged at {r.commit}"
                lines.append(f"pushed {r.folder} -> {head}, {state}")
        return "\n".join(lines)


def push(
    *, folder: str | Path, options: PushOptions = PushOptions(), token: str | None = None, evaluation: str | None = None
) -> PushResult:
    """Push `folder` (one α folder, a sweep of `alpha-*` folders, an adapter or a dataset folder).

    `evaluation` is a markdown table embedded in every card pushed; see the module doc.
    """
    from huggingface_hub import HfApi, constants

    root = Path(folder)
    if not root.is_dir():
        raise OptionsError("Folder to push does not exist", where=str(root), fix="Pass a tvtool output folder")
    targets = _targets(root)
    for target in targets:
        _check_links(target, root)
    if options.eval_summary is not None and evaluation is None:
        evaluation = _read_text(Path(options.eval_summary))
    endpoint = (options.endpoint or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token)
    template = options.repo or "{user}/{name}-alpha{alpha}"
    needs_user = options.repo is None or "{user}" in template or "/" not in template
    if constants.HF_HUB_OFFLINE and (needs_user or not options.dry_run):
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be pushed", where=endpoint,
                       fix="unset HF_HUB_OFFLINE (or HF_HUB_OFFLINE=0) to push, or give --repo in full with --dry-run")
    user = None
    if needs_user or not options.dry_run:  # a dry run reads at most who the token is
        with _hub_errors("check the token", where=endpoint):
            user = api.whoami(cache=True)["name"]
    name = root.parent.name if ALPHA_DIR.match(root.name) and len(targets) == 1 else root.name
    plans = []
    for target in targets:
        alpha, base = _metadata(target)
        repo_id = _repo_id(template if (alpha or options.repo) else "{user}/{name}", user, name, alpha)
        card = _card(target, repo_id=repo_id, repo_type=options.repo_type, alpha=alpha, base=base,
                     evaluation=evaluation if evaluation is not None else _read_summary(target))
        plans.append((target, repo_id, card))
    ids = [repo_id for _, repo_id, _ in plans]
    if len(set(ids)) != len(ids):
        raise OptionsError("Several folders map to the same repo", where=f"--repo {template}",
                           fix="Put {alpha} in the repo template")
    revision = options.revision or "main"
    pushed = []
    for target, repo_id, card in plans:
        files = tuple(sorted([(p, f.stat().st_size) for p, f in _files(target) if p != "README.md"]
                             + [("README.md", len(card))]))
        plan = RepoPush(folder=target, repo_id=repo_id, repo_type=options.repo_type, revision=revision, files=files,
                        visibility=_visibility(options))
        if not options.dry_run:
            plan = _push_one(api, plan, card, options)
        pushed.append(plan)
    return PushResult(repos=tuple(pushed), dry_run=options.dry_run)


def _push_one(api, plan: RepoPush, card: bytes, options: PushOptions) -> RepoPush:
    """Create repo and branch if missing, then one commit; no commit when nothing changed."""
    from huggingface_hub import CommitOperationAdd

    rid, rtype, rev = plan.repo_id, plan.repo_type, plan.revision
    where = f"{rtype} {rid}@{rev} at {api.endpoint}"
    with _hub_errors("create the repository", where=where):
        api.create_repo(rid, repo_type=rtype, private=options.private, exist_ok=True)
    if rev != "main":
        with _hub_errors(f"create the branch {rev}", where=where):
            api.create_branch(rid, branch=rev, repo_type=rtype, exist_ok=True)
    with _hub_errors("read the branch head", where=where):
        info = api.repo_info(rid, repo_type=rtype, revision=rev)
    if options.private and not info.private:  # exist_ok kept an existing public repo: do not publish into it
        raise HubError("The repository exists and is public, but the push is private", where=where,
                       fix="Make it private on the Hub first, or pass --public")
    head = info.sha
    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f)) for p, f in _files(plan.folder)
           if p != "README.md"]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    message = options.commit_message or f"Upload {plan.folder.name} with tvtool"
    log.info("pushing %d files (%d bytes) to %s", len(ops), plan.size, where)
    with _hub_errors("upload the files", where=where):
        info = api.create_commit(rid, operations=ops, commit_message=message, repo_type=rtype, revision=rev,
                                 parent_commit=head)
    return replace(plan, commit=info.oid, new_commit=info.oid != head)


@contextlib.contextmanager
def _hub_errors(action: str, *, where: str) -> Iterator[None]:
    """Turn huggingface_hub / transport errors into one HubError line (our words only: no token)."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalTokenNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    connect, transport = _transport_errors()
    try:
        yield
    except Exception as err:  # noqa: BLE001 - narrowed just below, everything else re-raised as is
        cause = err
        if type(err) is RuntimeError and isinstance(err.__cause__, (HfHubHTTPError, *transport)):
            cause = err.__cause__  # huggingface_hub wraps LFS upload failures in a bare RuntimeError
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if isinstance(cause, LocalTokenNotFoundError):
            raise HubError("No Hugging Face token found", where=where,
                           fix="Set HF_TOKEN or run `hf auth login`") from None
        if isinstance(cause, RepositoryNotFoundError):
            raise HubError("Repository not found or not visible with this token", where=where,
                           fix="Check the repo id and that the token belongs to its owner") from err
        if isinstance(cause, RevisionNotFoundError):
            raise HubError("Branch not found", where=where, fix="Check --revision") from err
        if isinstance(cause, HfHubHTTPError) and status == 401:
            raise HubError("The Hub rejected the token (HTTP 401)", where=where,
                           fix="Set HF_TOKEN or run `hf auth login` with a valid write token") from err
        if isinstance(cause, HfHubHTTPError) and status == 403:
            raise HubError(f"The token may not {action} (HTTP 403)", where=where,
                           fix="Use a write token of the repo's owner, or push to your own namespace") from err
        if isinstance(cause, HfHubHTTPError) and status == 412:
            raise HubError("The branch moved during the push (HTTP 412)", where=where, fix=RETRY_FIX) from err
        if isinstance(cause, HfHubHTTPError):
            raise HubError(f"The Hub failed to {action} (HTTP {status})", where=where, fix=RETRY_FIX) from err
        if isinstance(cause, connect):
            raise HubError(f"Cannot reach the Hub to {action}", where=where,
                           fix="Check the network and HF_ENDPOINT, then re-run") from err
        if isinstance(cause, transport):
            raise HubError(f"Lost the connection to the Hub trying to {action}", where=where,
                           fix=f"Check the network. {RETRY_FIX}") from err
        raise


def _transport_errors() -> tuple[tuple[type[Exception], ...], tuple[type[Exception], ...]]:
    """(connect errors, all connection-level errors) of the HTTP clients huggingface_hub may use:
    httpx2 (2.x), httpx (1.x), requests (0.x)."""
    connect: list[type[Exception]] = [ConnectionRefusedError]
    transport: list[type[Exception]] = [ConnectionError]
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            mod = importlib.import_module(name)
            connect.append(mod.ConnectError)
            transport.append(mod.TransportError)
    with contextlib.suppress(ImportError):
        import requests

        connect.append(requests.exceptions.ConnectionError)
        transport.append(requests.exceptions.RequestException)
    return tuple(connect), tuple(transport)


def _targets(root: Path) -> list[Path]:
    """The folders to push: the `alpha-*` children of a sweep folder, else the folder itself."""
    alphas = sorted(p for p in root.iterdir() if p.is_dir() and ALPHA_DIR.match(p.name))
    own = [p for p in root.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin") or
           p.name in ("config.json", "adapter_config.json")]
    if alphas and not own:
        return alphas
    if not any(True for _ in _files(root)):
        raise OptionsError("Folder to push has no files", where=str(root), fix="Pass a tvtool output folder")
    return [root]


def _files(folder: Path) -> Iterator[tuple[str, Path]]:
    """(path in repo, local path) for every file to upload, without VCS and cache folders."""
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not SKIP_PARTS & set(path.parts) and not rel.startswith(".cache/huggingface/"):
            yield rel, path


def _check_links(folder: Path, root: Path) -> None:
    """Refuse symlinks that lead out: push uploads what links point to, which may be anything.

    Resolved at every level: a target folder of a sweep (`root/alpha-0.5`) that is itself a link must lead
    inside `root` (the folder given, taken as it resolves), and every link inside it must stay inside it."""
    top = folder.resolve()
    links = [folder] if folder != root else []
    links += [p for p in sorted(folder.rglob("*")) if p.is_symlink()]
    for path in links:
        target, inside = path.resolve(), top if path != folder else root.resolve()
        if target != inside and inside not in target.parents:
            raise OptionsError(f"the folder to push has a link that leads out of it: "
                               f"{path.relative_to(root).as_posix()} -> {target}", where=str(root),
                               fix="replace the link by the file itself, or remove it")


def _visibility(options: PushOptions) -> str:
    """What a dry run tells about who will see the files."""
    if options.private:
        return "PRIVATE (a new repo is created private; an existing public repo is refused)"
    return "PUBLIC: anyone can download these files (a new repo is created public; drop --public to keep it private)"


def _metadata(folder: Path) -> tuple[str | None, str | list[str] | None]:
    """(α as in folder names, Hub ids of the parent models) of a folder to push.

    α: tvtool.json `settings.alpha` (as materialize writes it), else the card's `tvtool.alpha`,
    else the folder name. Parents: tvtool.json `base_model`, else the Hub ids among
    `settings.base` / `settings.reasoner`, else adapter_config.json `base_model_name_or_path`.
    """
    info: dict = {}
    if (folder / "tvtool.json").is_file():
        try:
            info = json.loads(_read_text(folder / "tvtool.json"))
        except ValueError:
            raise CheckpointError("tvtool.json is not valid JSON", where=str(folder / "tvtool.json"),
                                  fix="Fix or delete the file") from None
    settings = info.get("settings") if isinstance(info.get("settings"), dict) else info
    alpha = settings.get("alpha")
    if alpha is None and (folder / "README.md").is_file():
        extra = _load_card(folder / "README.md", "model").data.get("tvtool")
        alpha = extra.get("alpha") if isinstance(extra, dict) else None
    if alpha is None and (m := ALPHA_DIR.match(folder.name)):
        alpha = m.group(1)
    parents = info.get("base_model") or _hub_ids(settings.get("base"), settings.get("reasoner"))
    if not parents and (folder / "adapter_config.json").is_file():
        with contextlib.suppress(ValueError):
            parents = json.loads(_read_text(folder / "adapter_config.json")).get("base_model_name_or_path")
    if isinstance(parents, list) and len(parents) == 1:
        parents = parents[0]
    return (None if alpha is None else f"{alpha:g}" if isinstance(alpha, float) else str(alpha)), parents or None


def _hub_ids(*sources) -> list[str]:
    """Hub repo ids among sources given as ids, paths or {"repo_id", "source"} dicts (paths are dropped)."""
    out = []
    for src in sources:
        rid = (src.get("repo_id") or src.get("source")) if isinstance(src, dict) else src
        if isinstance(rid, str) and is_hub_id(rid) and rid not in out:
            out.append(rid)
    return out


def _repo_id(template: str, user: str | None, name: str, alpha: str | None) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    fields = {"user": user, "name": name, "alpha": alpha}
    used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    if used - fields.keys():
        raise OptionsError("Bad repo template", where=f"--repo {template}",
                           fix="Use only the fields {user}, {name} and {alpha}")
    if missing := sorted(f for f in used if fields[f] is None):
        raise OptionsError(f"Repo template needs {{{missing[0]}}} but it has no value", where=f"--repo {template}",
                           fix="Give the repo id in full, or an alpha in the folder's tvtool.json or name")
    repo_id = template.format_map(fields)
    repo_id = repo_id if "/" in repo_id else f"{user}/{repo_id}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise OptionsError("Not a valid Hub repo id", where=repr(repo_id),
                           fix="Use 'user/name' with letters, digits, '-', '_' and '.' only") from None
    return repo_id


def _card(folder: Path, *, repo_id: str, repo_type: str, alpha: str | None, base, evaluation: str | None) -> bytes:
    """README.md bytes to push: the folder's card (or a minimal one), with the evaluation section."""
    readme = folder / "README.md"
    if readme.is_file():
        text = _read_text(readme)
        _load_card(readme, repo_type)
    else:
        text = _new_card(folder, repo_id=repo_id, repo_type=repo_type, alpha=alpha, base=base)
    if evaluation:
        text = _with_evaluation(text, evaluation.strip())
    return text.encode()


def _new_card(folder: Path, *, repo_id: str, repo_type: str, alpha: str | None, base) -> str:
    from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData

    if repo_type == "dataset":
        data = DatasetCardData(tags=["tvtool"])
        return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n# {repo_id}\n\nDataset pushed with tvtool.\n"))
    adapter = (folder / "adapter_config.json").is_file()
    meta = {"library_name": "peft" if adapter else "transformers" if (folder / "config.json").is_file() else None,
            "tags": ["tvtool", "lora"] if adapter else ["tvtool", "merge", "task-arithmetic"]}
    if base:
        meta |= {"base_model": base, "base_model_relation": "adapter" if adapter else "merge"}
    data = ModelCardData(**{k: v for k, v in meta.items() if v is not None})
    what = "A LoRA adapter" if adapter else f"Merged weights θ1 + αΔ with α = {alpha}" if alpha else "Weights"
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {repo_id}\n\n{what}, made with tvtool.\n"))


def _with_evaluation(card: str, table: str) -> str:
    """Put `table` under '## Evaluation' (replacing that section if present, else appending it)."""
    section = f"## Evaluation\n\n{table}\n"
    m = re.search(r"^## Evaluation[ \t]*\n.*?(?=^## |\Z)", card, re.M | re.S)
    if m:
        return card[: m.start()] + section + ("\n" if m.end() < len(card) else "") + card[m.end():]
    return card.rstrip("\n") + "\n\n" + section


def _load_card(path: Path, repo_type: str):
    """The card at `path`, parsed; CheckpointError if its YAML metadata block does not parse."""
    import yaml
    from huggingface_hub import DatasetCard, ModelCard

    try:
        return (DatasetCard if repo_type == "dataset" else ModelCard)(_read_text(path))
    except (ValueError, yaml.YAMLError):
        raise CheckpointError("README.md metadata does not parse", where=str(path),
                              fix="Fix the YAML block between the '---' lines, or delete README.md") from None


def _read_summary(folder: Path) -> str | None:
    return _read_text(folder / "summary.md") if (folder / "summary.md").is_file() else None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise OptionsError("Cannot read file", where=str(path), fix=f"Check the path ({type(err).__name__})") from None
