"""A small in-memory Hugging Face Hub on 127.0.0.1, for tests (no PyPI package emulates the Hub).

Speaks enough of the Hub's HTTP API for huggingface_hub's `whoami`, `create_repo`, `create_branch`,
`upload_folder` / `create_commit` (every file is a regular git blob sent inline: the emulator never answers
"lfs", so no LFS or Xet storage is involved), `add_space_variable`, `repo_info`, tree listings and
`hf_hub_download` / `snapshot_download` (HEAD + GET on `resolve`, with Range), which is what transformers'
`from_pretrained` uses. README front matter is validated as the Hub does on commit (YAML mapping; Spaces
need a known `sdk`). Point clients at it with `HF_ENDPOINT=emulator.url` in a fresh process.

    with HubEmulator(tokens={"hf_test": "user"}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test"}
        ...
        hub.files("user/model")  # {path: bytes} at main
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

SPACE_SDKS = {"gradio", "streamlit", "docker", "static"}
TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    owner: str
    sdk: str | None = None
    hardware: str | None = None
    branches: dict = field(default_factory=lambda: {"main": ("0" * 40, {})})  # name -> (commit sha, files)
    commits: list = field(default_factory=list)  # (sha, branch, summary)
    snapshots: dict = field(default_factory=dict)  # commit sha -> files, so clients can pin a commit
    variables: dict = field(default_factory=dict)


def front_matter_errors(text: str, repo_type: str) -> list[str]:
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return ["Spaces need a YAML front matter block"] if repo_type == "space" else []
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        return [f"invalid YAML: {err}"]
    if not isinstance(meta, dict):
        return ["the front matter must be a YAML mapping"]
    if repo_type == "space" and meta.get("sdk") not in SPACE_SDKS:
        return [f"\"sdk\" must be one of {sorted(SPACE_SDKS)}, got {meta.get('sdk')!r}"]
    return []


class HubEmulator:
    def __init__(self, tokens: dict[str, str] | None = None):
        self.tokens = dict(tokens or {"hf_emulator": "user"})  # token -> user name
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status): what clients asked
        self.lock = threading.RLock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[(repo_type, repo_id)].branches[revision][1])

    # ---- request handling (called by the handler with the parsed request) ----

    def user(self, headers) -> str | None:
        auth = headers.get("Authorization", "")
        return self.tokens.get(auth[7:]) if auth.startswith("Bearer ") else None

    def route(self, method: str, path: str, query: dict, headers, body: bytes):
        """Returns (status, headers, body bytes or JSON-able)."""
        user = self.user(headers)
        if path == "/api/whoami-v2":
            return (200, {}, {"type": "user", "name": user, "auth": {"accessToken": {"role": "write"}}}) if user \
                else _error(401, "Invalid credentials in Authorization header")
        if path == "/api/validate-yaml" and method == "POST":
            payload = json.loads(body)
            errors = front_matter_errors(payload.get("content", ""), payload.get("repoType", "model"))
            return (400 if errors else 200), {}, {"errors": [{"message": e} for e in errors], "warnings": []}
        if path == "/api/repos/create" and method == "POST":
            return self.create_repo(user, json.loads(body))
        m = re.match(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(\w[\w-]*)(?:/(.*))?)?$", path)
        if m:
            return self.api(method, TYPES[m.group(1)], m.group(2), m.group(3), unquote(m.group(4) or ""), user,
                            query, body)
        m = re.match(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            kind = TYPES.get(m.group(1) or "", "model") if m.group(1) else "model"
            return self.resolve(method, kind, m.group(2), unquote(m.group(3)), unquote(m.group(4)), user, headers)
        return _error(404, f"no route for {method} {path}")

    def repo(self, repo_type, repo_id, user, write=False):
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and user != repo.owner):
            return None, _error(404 if user else 401, "Repository Not Found", "RepoNotFound")
        if write and user != repo.owner:
            return None, _error(403, f"You don't have the rights to write to {repo_id}")
        return repo, None

    def create_repo(self, user, payload):
        if user is None:
            return _error(401, "Invalid credentials in Authorization header")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.url}/{prefix}{repo_id}"
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                return 409, {}, {"error": f"You already created this {repo_type} repo", "url": url}
            if repo_id.split("/")[0] != user:
                return _error(403, f"You don't have the rights to create repos under {repo_id.split('/')[0]}")
            if repo_type == "space" and payload.get("sdk") not in SPACE_SDKS:
                return _error(400, f"sdk must be one of {sorted(SPACE_SDKS)}")
            repo = Repo(repo_type, repo_id, payload.get("visibility", "public") == "private" or bool(
                payload.get("private")), user, payload.get("sdk"), payload.get("hardware"))
            repo.variables = {v["key"]: v["value"] for v in payload.get("variables") or []}
            self.repos[(repo_type, repo_id)] = repo
        return 200, {}, {"url": url, "name": repo_id}

    def api(self, method, repo_type, repo_id, action, rest, user, query, body):
        write = method == "POST"
        repo, error = self.repo(repo_type, repo_id, user, write=write)
        if error:
            return error
        with self.lock:
            if action is None or action == "revision":
                return self.info(repo, rest or "main")
            if action == "branch" and write:
                return self.create_branch(repo, rest, json.loads(body or b"{}"))
            if action == "preupload" and write:
                files = repo.branches.get(rest, repo.branches["main"])[1]
                return 200, {}, {"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                     "oid": git_blob_sha(files[f["path"]]) if f["path"] in files else None}
                    for f in json.loads(body)["files"]]}
            if action == "commit" and write:
                return self.commit(repo, rest, body)
            if action == "tree":
                revision, _, folder = rest.partition("/")
                return self.tree(repo, revision, folder, query.get("recursive", ["false"])[0] in ("1", "true", "True"))
            if action == "variables" and repo_type == "space":
                if write:
                    item = json.loads(body)
                    repo.variables[item["key"]] = item["value"]
                return 200, {}, {k: {"value": v} for k, v in repo.variables.items()}
        return _error(404, f"{method} {action} is not emulated")

    def create_branch(self, repo, name, payload):
        if name in repo.branches:
            return _error(409, f"Branch {name} already exists")
        start = payload.get("startingPoint", "main")
        repo.branches[name] = (repo.branches[start][0], dict(repo.branches[start][1]))
        return 200, {}, {}

    def commit(self, repo, revision, body):
        if revision not in repo.branches:
            return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        parent, files = repo.branches[revision]
        files, summary = dict(files), ""
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                summary = value.get("summary", "")
            elif item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                files = {p: d for p, d in files.items() if p != value["path"] and not p.startswith(
                    value["path"].rstrip("/") + "/")}
            else:
                return _error(400, f"commit operation {item['key']} is not emulated")
        if "README.md" in files:
            errors = front_matter_errors(files["README.md"].decode(), repo.repo_type)
            if errors:
                return _error(400, "Invalid metadata in README.md: " + "; ".join(errors))
        sha = hashlib.sha1((parent + summary + json.dumps(sorted((p, git_blob_sha(d)) for p, d in files.items())))
                           .encode()).hexdigest()
        repo.branches[revision] = (sha, files)
        repo.snapshots[sha] = files
        repo.commits.append((sha, revision, summary))
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return 200, {}, {"commitUrl": f"{self.url}/{prefix}{repo.repo_id}/commit/{sha}", "commitOid": sha,
                         "pullRequestUrl": None}

    def info(self, repo, revision):
        if _lookup(repo, revision) is None:
            return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        sha, files = _lookup(repo, revision)
        data = {"id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": repo.private,
                "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                "siblings": [{"rfilename": p, "size": len(d)} for p, d in sorted(files.items())]}
        if repo.repo_type == "space":
            data.update(sdk=repo.sdk, runtime={"stage": "BUILDING", "hardware": {"requested": repo.hardware}})
        return 200, {}, data

    def tree(self, repo, revision, folder, recursive):
        if _lookup(repo, revision) is None:
            return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries, dirs = [], set()
        for path, data in sorted(_lookup(repo, revision)[1].items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                dirs.add(prefix + rest.split("/")[0])
                continue
            entries.append({"type": "file", "path": path, "size": len(data), "oid": git_blob_sha(data)})
        if prefix and not entries and not dirs:
            return _error(404, f"{folder} does not exist", "EntryNotFound")
        return 200, {}, [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in sorted(dirs)] + entries

    def resolve(self, method, repo_type, repo_id, revision, path, user, headers):
        repo, error = self.repo(repo_type, repo_id, user)
        if error:
            return error
        with self.lock:
            if _lookup(repo, revision) is None:
                return _error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            sha, files = _lookup(repo, revision)
            if path not in files:
                return _error(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
            data = files[path]
        head = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(data)}"', "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream"}
        status, byte_range = 200, re.match(r"bytes=(\d+)-(\d*)$", headers.get("Range", ""))
        if byte_range:
            start = int(byte_range.group(1))
            end = int(byte_range.group(2)) if byte_range.group(2) else len(data) - 1
            head["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        return status, head, data


def _lookup(repo: Repo, revision: str):
    """(commit sha, files) of a branch name or a commit sha; None if neither."""
    if revision in repo.branches:
        return repo.branches[revision]
    if revision in repo.snapshots:
        return revision, repo.snapshots[revision]
    return None


def _error(status, message, code=None, extra_headers=None):
    headers = dict(extra_headers or {})
    if code:
        headers["X-Error-Code"] = code
    headers["X-Error-Message"] = message
    return status, headers, {"error": message}


def _make_handler(hub: HubEmulator):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: the hub records requests instead
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _serve(self, method):
            url = urlsplit(self.path)
            body = self._body()
            try:
                status, headers, payload = hub.route(method, url.path, parse_qs(url.query), self.headers, body)
            except Exception as err:  # a bug in the emulator: report it as the Hub would, a 500
                status, headers, payload = _error(500, f"emulator error: {type(err).__name__}: {err}")
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            if not isinstance(payload, bytes):
                headers.setdefault("Content-Type", "application/json")
            hub.requests.append((method, url.path, status))
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(data)

        def do_GET(self):
            self._serve("GET")

        def do_HEAD(self):
            self._serve("HEAD")

        def do_POST(self):
            self._serve("POST")

        def do_PUT(self):
            self._serve("PUT")

        def do_DELETE(self):
            self._serve("DELETE")

    return Handler
