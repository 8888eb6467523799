"""A small Hugging Face Hub-protocol server for tests (stdlib, plus PyYAML for card metadata).

The tests point the real `huggingface_hub` client (HF_ENDPOINT, HF_HUB_DISABLE_XET=1) at it,
so uploads, LFS, commits, branches and downloads go through the client's own code paths.
Routes, payloads and headers follow what huggingface_hub 2.4 sends and expects
(hf_api.py, _commit_api.py, lfs.py, file_download.py). Everything lives in memory.

    python tests/hubserver.py --port 8123 --token alice=hf_alice_secret --token bob=hf_bob_secret

Like the real Hub, a commit whose files equal the parent's still makes a (empty) commit:
the client avoids it by comparing the `oid`s that preupload returns. Test-only routes:
`GET /_test/stats` (request counters, also the readiness probe) and `POST /_test/fault`
({"method", "path_contains", "times", "status"?}: the next matching requests get that HTTP
status, or without one a dropped connection and no answer).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import json
import re
import secrets
import socket
import threading
import traceback
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

try:
    import yaml
except ImportError:  # validate-yaml and cardData then only check the block exists
    yaml = None

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".parquet", ".arrow", ".h5", ".onnx",
                ".gguf", ".npy", ".npz", ".pkl", ".pickle", ".zip", ".gz", ".tar", ".msgpack", ".model")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
REGULAR_MAX = 10 * 1024 * 1024
API_RE = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+?)(?:/(revision|tree|paths-info|refs|commits|branch"
                    r"|preupload|commit)(?:/([^/]*))?(?:/(.+))?)?$")
RESOLVE_RE = re.compile(r"^/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
LFS_RE = re.compile(r"^/(datasets/)?([^/]+/[^/]+)\.git/info/lfs/objects/(batch|verify)$")


class Reply(Exception):
    """An HTTP error answer, with the Hub's X-Error-Code / X-Error-Message headers."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Entry:
    """One file of a commit: regular (content keyed by git blob id) or LFS (keyed by sha256)."""

    size: int
    blob_id: str
    sha256: str | None = None

    def info(self, path: str) -> dict:
        out = {"type": "file", "oid": self.blob_id, "size": self.size, "path": path}
        if self.sha256:
            out["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(lfs_pointer(self.sha256, self.size))}
        return out


@dataclass
class Commit:
    id: str
    parents: list[str]
    files: dict[str, Entry]
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    type: str
    id: str
    owner: str
    private: bool
    created: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs: set[str] = field(default_factory=set)

    def url(self, base: str) -> str:
        return f"{base}/{'datasets/' if self.type == 'dataset' else ''}{self.id}"

    def resolve(self, rev: str) -> Commit:
        cid = self.branches.get(rev) or (rev if rev in self.commits else None)
        if cid is None:
            raise Reply(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return self.commits[cid]

    def commit(self, branch: str, files: dict[str, Entry], title: str, message: str, author: str) -> Commit:
        parent = self.branches.get(branch)
        tree = hashlib.sha1(json.dumps({p: e.blob_id for p, e in sorted(files.items())}).encode()).hexdigest()
        salt = f"{tree}\n{parent}\n{author}\n{title}\n{message}\n{now()}\n{secrets.token_hex(8)}"
        c = Commit(hashlib.sha1(salt.encode()).hexdigest(), [parent] if parent else [], files, title, message,
                   author, now())
        self.commits[c.id] = c
        self.branches[branch] = c.id
        return c


def _dirs(files: dict[str, Entry]) -> dict[str, str]:
    """Every folder of a file set -> a stable id made from its content."""
    out: dict[str, list[str]] = {}
    for path, e in files.items():
        parts = path.split("/")
        for i in range(1, len(parts)):
            out.setdefault("/".join(parts[:i]), []).append(f"{path}:{e.blob_id}")
    return {d: hashlib.sha1("\n".join(sorted(v)).encode()).hexdigest() for d, v in out.items()}


def _card_data(content: str) -> dict | None:
    """The card's YAML metadata block as a dict; None if absent; ValueError if it is not a mapping."""
    m = re.match(r"^---\r?\n(.*?)\r?\n?---\r?\n", content, re.S)
    if m is None or yaml is None:
        return None
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError as err:
        raise ValueError(str(err).replace("\n", " ")) from None
    if data is not None and not isinstance(data, dict):
        raise ValueError("metadata block is not a YAML mapping")
    return data or None


class Hub:
    """All state, behind one lock: users, repos, content-addressed blobs, LFS upload tickets."""

    def __init__(self, tokens: dict[str, str]):
        self.tokens, self.repos, self.blobs, self.tickets = tokens, {}, {}, {}
        self.stats: Counter = Counter()
        self.faults: list[dict] = []
        self.lock = threading.RLock()

    def repo(self, rtype: str, rid: str, user: str | None) -> Repo:
        repo = self.repos.get((rtype, rid))
        if repo is None or (repo.private and repo.owner != user):
            raise Reply(404, "Repository not found", "RepoNotFound")
        return repo

    def writable(self, rtype: str, rid: str, user: str | None) -> Repo:
        if user is None:
            raise Reply(401, "You must be authenticated to write to a repository")
        repo = self.repo(rtype, rid, user)
        if repo.owner != user:
            raise Reply(403, f"You don't have the rights to write to {rid}")
        return repo

    def put_blob(self, data: bytes, key: str) -> None:
        self.blobs.setdefault(key, data)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: Hub

    def log_message(self, format, *args):  # quiet: tests read the counters instead
        pass

    # -- plumbing ---------------------------------------------------------------------------
    def do_GET(self): self.dispatch("GET")  # noqa: E704
    def do_HEAD(self): self.dispatch("HEAD")  # noqa: E704
    def do_POST(self): self.dispatch("POST")  # noqa: E704
    def do_PUT(self): self.dispatch("PUT")  # noqa: E704
    def do_DELETE(self): self.dispatch("DELETE")  # noqa: E704

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def json_body(self) -> dict:
        try:
            return json.loads(self.raw or b"{}")
        except ValueError:
            raise Reply(400, "Body is not valid JSON") from None

    def send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def user(self) -> str | None:
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        for name, tok in self.hub.tokens.items():
            if secrets.compare_digest(tok, token):
                return name
        raise Reply(401, "Invalid credentials in Authorization header")

    def dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        self.query = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
        self.raw = self.body()
        with self.hub.lock:
            if not path.startswith("/_test/"):
                self.hub.stats[f"{method} {re.sub(r'/[0-9a-f]{32}$', '/*', path)}"] += 1
            fault = next((f for f in self.hub.faults if f["times"] > 0 and f["method"] == method
                          and f["path_contains"] in path), None)
            if fault is not None:
                fault["times"] -= 1
        if fault is not None and fault.get("status"):  # an error answer, e.g. storage refusing a PUT
            return self.send(fault["status"], {"error": "injected fault"}, {"X-Error-Message": "injected fault"})
        if fault is not None:  # a network failure: the connection drops, no answer at all
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.base = f"http://{self.headers.get('Host', 'localhost')}"
        try:
            with self.hub.lock:
                self.route(method, path)
        except Reply as r:
            headers = {"X-Error-Message": r.message} | ({"X-Error-Code": r.code} if r.code else {})
            self.send(r.status, {"error": r.message, **r.extra}, headers)
        except Exception as err:  # a malformed request or a server bug: answer, and show it in the server log
            traceback.print_exc()
            self.send(400, {"error": f"{type(err).__name__}: {err}"}, {"X-Error-Message": type(err).__name__})

    def route(self, method: str, path: str) -> None:  # noqa: C901 - one flat table of routes
        if path == "/_test/stats" and method == "GET":
            return self.send(200, dict(self.hub.stats))
        if path == "/_test/fault" and method == "POST":
            self.hub.faults.append(self.json_body())
            return self.send(200, {})
        if path.startswith("/_lfs/upload/") and method == "PUT":
            return self.lfs_put(path.rsplit("/", 1)[1])
        user = self.user()
        if path == "/api/whoami-v2" and method == "GET":
            if user is None:
                raise Reply(401, "Invalid credentials in Authorization header")
            return self.send(200, {"type": "user", "name": user, "fullname": user, "orgs": [],
                                   "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        if path == "/api/repos/create" and method == "POST":
            return self.create_repo(user, self.json_body())
        if path == "/api/repos/delete" and method == "DELETE":
            body = self.json_body()
            rid = f"{body.get('organization') or user}/{body['name']}"
            repo = self.hub.writable(body.get("type") or "model", rid, user)
            del self.hub.repos[(repo.type, repo.id)]
            return self.send(200, {})
        if path == "/api/validate-yaml" and method == "POST":
            return self.validate_yaml(self.json_body())
        if m := API_RE.match(path):
            rtype, rid, verb, arg, rest = m.group(1)[:-1], m.group(2), m.group(3), m.group(4), m.group(5)
            arg = unquote(arg) if arg is not None else None
            return self.api(method, user, rtype, rid, verb, arg, unquote(rest) if rest else None)
        if m := LFS_RE.match(path):
            return self.lfs(m.group(3), user, "dataset" if m.group(1) else "model", m.group(2))
        if (m := RESOLVE_RE.match(path)) and method in ("GET", "HEAD"):
            repo = self.hub.repo("dataset" if m.group(1) else "model", m.group(2), user)
            return self.resolve(repo, unquote(m.group(3)), unquote(m.group(4)))
        raise Reply(404, f"No route for {method} {path}")

    # -- repos --------------------------------------------------------------------------------
    def create_repo(self, user: str | None, body: dict) -> None:
        if user is None:
            raise Reply(401, "You must be authenticated to create a repository")
        owner, rtype = body.get("organization") or user, body.get("type") or "model"
        if owner != user:
            raise Reply(403, f"You don't have the rights to create a repository under {owner}")
        if rtype not in ("model", "dataset"):
            raise Reply(400, f"Repository type {rtype} is not supported by this server")
        rid = f"{owner}/{body['name']}"
        if (rtype, rid) in self.hub.repos:  # the Hub's 409 carries the url: create_repo(exist_ok=True) reads it
            raise Reply(409, f"You already created this {rtype} repo", url=self.hub.repos[(rtype, rid)].url(self.base))
        repo = Repo(rtype, rid, owner, body.get("visibility") == "private" or bool(body.get("private")), now())
        self.hub.put_blob(GITATTRIBUTES, git_blob_id(GITATTRIBUTES))
        repo.commit("main", {".gitattributes": Entry(len(GITATTRIBUTES), git_blob_id(GITATTRIBUTES))},
                     "initial commit", "", "system")
        self.hub.repos[(rtype, rid)] = repo
        self.send(200, {"url": repo.url(self.base), "name": rid, "id": secrets.token_hex(12)})

    def validate_yaml(self, body: dict) -> None:
        try:
            _card_data(body.get("content", ""))
        except ValueError as err:
            return self.send(400, {"errors": [{"message": str(err)}], "warnings": []}, {"X-Error-Message": str(err)})
        self.send(200, {"errors": [], "warnings": []})

    def api(self, method, user, rtype, rid, verb, arg, rest) -> None:
        if verb in (None, "revision") and method == "GET":
            repo = self.hub.repo(rtype, rid, user)
            return self.send(200, self.info(repo, repo.resolve(arg or "main")))
        if verb == "tree" and method == "GET":
            repo = self.hub.repo(rtype, rid, user)
            return self.send(200, self.tree(repo.resolve(arg or "main"), rest or "",
                                            self.query.get("recursive", "").lower() in ("1", "true")))
        if verb == "paths-info" and method == "POST":
            repo = self.hub.repo(rtype, rid, user)
            commit, form = repo.resolve(arg or "main"), parse_qs(self.raw.decode())
            items = {e["path"]: e for e in self.tree(commit, "", True)}
            return self.send(200, [items[p.strip("/")] for p in form.get("paths", []) if p.strip("/") in items])
        if verb == "refs" and method == "GET":
            repo = self.hub.repo(rtype, rid, user)
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in repo.branches.items()]
            return self.send(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": []})
        if verb == "commits" and method == "GET":
            repo = self.hub.repo(rtype, rid, user)
            out, c = [], repo.resolve(arg or "main")
            while c is not None:
                out.append({"id": c.id, "authors": [{"user": c.author}], "date": c.date, "title": c.title,
                            "message": c.message})
                c = repo.commits[c.parents[0]] if c.parents else None
            return self.send(200, out)
        if verb == "branch" and method == "POST":
            repo = self.hub.writable(rtype, rid, user)
            if arg in repo.branches:
                raise Reply(409, f"Reference refs/heads/{arg} already exists")
            start = self.json_body().get("startingPoint") or "main"
            repo.branches[arg] = repo.resolve(start).id
            return self.send(200, {})
        if verb == "preupload" and method == "POST":
            return self.preupload(self.hub.writable(rtype, rid, user), arg, self.json_body())
        if verb == "commit" and method == "POST":
            return self.commit(self.hub.writable(rtype, rid, user), arg, user)
        raise Reply(404, f"No route for {method} {verb}")

    def info(self, repo: Repo, commit: Commit) -> dict:
        readme = commit.files.get("README.md")
        card = None
        if readme is not None and readme.sha256 is None:
            try:
                card = _card_data(self.hub.blobs[readme.blob_id].decode())
            except (ValueError, UnicodeDecodeError):
                card = None
        siblings = [{"rfilename": p} | ({"size": e.size, "blobId": e.blob_id} if self.query.get("blobs") else {})
                    for p, e in sorted(commit.files.items())]
        return {"_id": hashlib.sha1(repo.id.encode()).hexdigest()[:24], "id": repo.id, "author": repo.owner,
                "sha": commit.id, "private": repo.private, "gated": False, "disabled": False, "downloads": 0,
                "likes": 0, "tags": [], "createdAt": repo.created, "lastModified": commit.date,
                "siblings": siblings, **({"cardData": card} if card else {})}

    def tree(self, commit: Commit, folder: str, recursive: bool) -> list[dict]:
        folder = folder.strip("/")
        dirs = _dirs(commit.files)
        if folder and folder not in dirs:
            raise Reply(404, f"Entry not found: {folder}", "EntryNotFound")
        prefix = f"{folder}/" if folder else ""
        out = []
        for path, oid in sorted(dirs.items()):
            rel = path[len(prefix):]
            if path.startswith(prefix) and rel and (recursive or "/" not in rel):
                out.append({"type": "directory", "oid": oid, "size": 0, "path": path})
        for path, entry in sorted(commit.files.items()):
            rel = path[len(prefix):]
            if path.startswith(prefix) and (recursive or "/" not in rel):
                out.append(entry.info(path))
        return out

    # -- uploads --------------------------------------------------------------------------------
    def preupload(self, repo: Repo, rev: str, body: dict) -> None:
        files = repo.resolve(rev).files
        out = []
        for f in body.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = f["size"] > 0 and (f["path"].endswith(LFS_SUFFIXES) or f["size"] >= REGULAR_MAX or b"\0" in sample)
            old = files.get(f["path"])
            oid = None if old is None else (old.sha256 or old.blob_id)
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        self.send(200, {"files": out, "commitOid": repo.resolve(rev).id})

    def lfs(self, action: str, user: str | None, rtype: str, rid: str) -> None:
        repo = self.hub.writable(rtype, rid, user)
        body = self.json_body()
        if action == "verify":
            if body.get("oid") not in repo.lfs:
                raise Reply(404, f"LFS object {body.get('oid')} not found")
            return self.send(200, {})
        if body.get("operation") != "upload":
            raise Reply(400, "Only the upload operation is supported by this server")
        objects = []
        for obj in body.get("objects", []):
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in repo.lfs:
                ticket = secrets.token_hex(16)
                self.hub.tickets[ticket] = ((rtype, rid), obj["oid"], obj["size"])
                item["actions"] = {
                    "upload": {"href": f"{self.base}/_lfs/upload/{ticket}", "header": {}},
                    "verify": {"href": f"{repo.url(self.base)}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(item)
        self.send(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_put(self, ticket: str) -> None:
        if ticket not in self.hub.tickets:
            raise Reply(403, "Upload URL is not valid")
        key, oid, size = self.hub.tickets[ticket]
        if hashlib.sha256(self.raw).hexdigest() != oid or len(self.raw) != size:
            raise Reply(400, "Uploaded content does not match its oid and size")
        self.hub.put_blob(self.raw, oid)
        if key in self.hub.repos:
            self.hub.repos[key].lfs.add(oid)
        self.send(200, {}, {"ETag": f'"{oid}"'})

    def commit(self, repo: Repo, rev: str, user: str) -> None:
        if self.query.get("create_pr"):
            raise Reply(400, "Pull requests are not supported by this server")
        if rev not in repo.branches:
            raise Reply(404, f"Invalid rev id: {rev}" if not re.fullmatch(r"[0-9a-f]{40}", rev)
                        else "Commits can only be made on a branch", "RevisionNotFound")
        lines = [json.loads(line) for line in self.raw.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise Reply(400, "The first line must be the commit header")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent and parent != repo.branches[rev]:
            raise Reply(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.resolve(rev).files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "").strip("/")
            if key == "file":
                data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else \
                    value["content"].encode()
                self.hub.put_blob(data, git_blob_id(data))
                files[path] = Entry(len(data), git_blob_id(data))
            elif key == "lfsFile":
                if value["oid"] not in repo.lfs:
                    raise Reply(400, f"LFS object {value['oid']} for {path} was never uploaded")
                size = len(self.hub.blobs[value["oid"]])
                files[path] = Entry(size, git_blob_id(lfs_pointer(value["oid"], size)), value["oid"])
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise Reply(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                files = {p: e for p, e in files.items() if not p.startswith(path + "/")}
            else:
                raise Reply(400, f"Unknown commit operation {key}")
        c = repo.commit(rev, files, header.get("summary") or "Update", header.get("description") or "", user)
        self.send(200, {"success": True, "commitOid": c.id, "commitUrl": f"{repo.url(self.base)}/commit/{c.id}",
                        "hookOutput": ""})

    # -- downloads ------------------------------------------------------------------------------
    def resolve(self, repo: Repo, rev: str, path: str) -> None:
        commit = repo.resolve(rev)
        entry = commit.files.get(path)
        if entry is None:
            raise Reply(404, f"Entry not found: {path}", "EntryNotFound")
        data = self.hub.blobs[entry.sha256 or entry.blob_id]
        etag = f'"{entry.sha256 or entry.blob_id}"'
        headers = {"X-Repo-Commit": commit.id, "ETag": etag, "Accept-Ranges": "bytes"}
        if entry.sha256:
            headers |= {"X-Linked-Etag": etag, "X-Linked-Size": str(entry.size)}
        start = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if start and 0 < int(start.group(1)) < len(data):
            n = int(start.group(1))
            headers["Content-Range"] = f"bytes {n}-{len(data) - 1}/{len(data)}"
            return self.send(206, headers=headers, raw=data[n:])
        self.send(200, headers=headers, raw=data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", action="append", default=[], help="user=token, repeatable")
    args = parser.parse_args(argv)
    Handler.hub = Hub(dict(t.split("=", 1) for t in args.token))
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
