"""A small in-memory Hub-compatible HTTP server for tests: just what huggingface_hub's client needs to create repos
and branches, commit files (regular inline and LFS via the batch API), list trees and download files.

Used by tests/test_push.py as `with HubServer(token="hf_...") as hub: ...` (binds 127.0.0.1 on a free port, serves
from a daemon thread, stops on exit). Nothing runs at import. Not a full Hub: no PRs, tags, xet or pagination.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".h5", ".ckpt", ".zip", ".parquet")
LFS_MIN_SIZE = 10 * 1024 * 1024
API_OPS = "revision|tree|preupload|commit|branch|paths-info|refs"
API_ROUTE = re.compile(rf"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)(?:/(?P<op>{API_OPS})(?:/(?P<rest>.*))?)?$")
RESOLVE_ROUTE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
LFS_BATCH_ROUTE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/(?P<op>batch|verify)$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def front_matter_error(text: str) -> str | None:
    """Why a README's YAML front matter is invalid (not YAML, or not a mapping), or None when it is fine."""
    if not text.startswith("---"):
        return None
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return "metadata block is not closed by '---'"
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        return f"invalid YAML in metadata: {str(exc).splitlines()[0]}"
    if meta is not None and not isinstance(meta, dict):
        return "metadata must be a YAML mapping"
    return None


@dataclass
class StoredFile:
    data: bytes
    lfs_oid: str | None = None  # sha256 when stored through LFS

    def tree_entry(self, path: str) -> dict:
        entry = {"type": "file", "path": path, "size": len(self.data), "oid": git_blob_sha1(self.data)}
        if self.lfs_oid:
            entry["lfs"] = {"oid": self.lfs_oid, "size": len(self.data), "pointerSize": 134}
        return entry

    @property
    def etag(self) -> str:
        return self.lfs_oid or git_blob_sha1(self.data)


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict] = field(default_factory=dict)  # oid -> {"files", "parent", "message"}

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        matches = [oid for oid in self.commits if oid.startswith(revision) and len(revision) >= 7]
        return matches[0] if len(matches) == 1 else None


class HubState:
    """Repositories, LFS blobs and the request log, shared by the handler threads under one lock."""

    def __init__(self, token: str | None):
        self.token, self.lock = token, threading.Lock()
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.counter = 0

    def new_commit(self, repo: Repo, parent: str | None, files: dict[str, StoredFile], message: str) -> str:
        self.counter += 1
        oid = hashlib.sha1(f"{repo.repo_id}:{self.counter}:{message}:{time.time()}".encode()).hexdigest()
        repo.commits[oid] = {"files": files, "parent": parent, "message": message}
        return oid

    def create_repo(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id, private)
        attributes = "\n".join(f"*{s} filter=lfs diff=lfs merge=lfs -text" for s in LFS_SUFFIXES) + "\n"
        oid = self.new_commit(repo, None, {".gitattributes": StoredFile(attributes.encode())}, "initial commit")
        repo.branches["main"] = oid
        self.repos[repo_id] = repo
        return repo

    def files(self, repo_id: str, revision: str = "main") -> dict[str, StoredFile]:
        """Files of a branch or commit (for assertions in tests)."""
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)]["files"]


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class Handler(BaseHTTPRequestHandler):
    """Routes each request to a method; every error is a JSON body with an `error` and an X-Error-Code header."""

    server: "_Server"

    def log_message(self, format, *args):  # quiet
        return

    # ------------------------------------------------------------------------------------------- plumbing

    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> dict:
        try:
            return json.loads(self._body() or b"{}")
        except ValueError:
            raise HttpError(400, "body is not JSON") from None

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data, status: int = 200, headers: dict | None = None):
        self._send(status, json.dumps(data).encode(), headers)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return bool(auth.startswith("Bearer ") and (self.state.token is None or auth[7:] == self.state.token))

    def _need_write(self):
        if not self._authorized():
            raise HttpError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str) -> Repo:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            raise HttpError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> str:
        oid = repo.resolve(unquote(revision))
        if oid is None:
            raise HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return oid

    def _dispatch(self):
        url = urlsplit(self.path)
        self.state.requests.append((self.command, url.path))
        try:
            with self.state.lock:
                self._route(url.path, parse_qs(url.query))
        except HttpError as exc:
            headers = {"X-Error-Code": exc.code} if exc.code else {}
            self._json({"error": exc.message, **exc.extra}, exc.status, {**headers, "X-Error-Message": exc.message})

    do_GET = do_POST = do_PUT = do_HEAD = lambda self: self._dispatch()

    def _route(self, path: str, query: dict):
        if path == "/api/repos/create" and self.command == "POST":
            return self.create_repo()
        if path == "/api/validate-yaml" and self.command == "POST":
            return self.validate_yaml()
        if path.startswith("/__lfs/") and self.command == "PUT":
            return self.lfs_put(path[len("/__lfs/"):])
        if match := LFS_BATCH_ROUTE.match(path):
            return self.lfs_batch(match["repo"]) if match["op"] == "batch" else self.lfs_verify(match["repo"])
        if match := RESOLVE_ROUTE.match(path):
            return self.resolve(match["repo"], match["rev"], unquote(match["path"]))
        if match := API_ROUTE.match(path):
            return self.api(match["repo"], match["op"], match["rest"] or "", query)
        raise HttpError(404, f"no route for {self.command} {path}")

    def api(self, repo_id: str, op: str | None, rest: str, query: dict):
        routes = {(None, "GET"): lambda: self.repo_info(repo_id, "main"),
                  ("revision", "GET"): lambda: self.repo_info(repo_id, rest),
                  ("tree", "GET"): lambda: self.tree(repo_id, rest, query),
                  ("preupload", "POST"): lambda: self.preupload(repo_id, rest),
                  ("commit", "POST"): lambda: self.commit(repo_id, rest),
                  ("branch", "POST"): lambda: self.create_branch(repo_id, rest),
                  ("paths-info", "POST"): lambda: self.paths_info(repo_id, rest),
                  ("refs", "GET"): lambda: self.refs(repo_id)}
        if (op, self.command) not in routes:
            raise HttpError(404, f"no route for {self.command} {op}")
        return routes[(op, self.command)]()

    # ------------------------------------------------------------------------------------------- endpoints

    def create_repo(self):
        self._need_write()
        body = self._json_body()
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else f"user/{body['name']}"
        if repo_id in self.state.repos:
            raise HttpError(409, "You already created this model repo", url=f"{self.base}/{repo_id}")
        self.state.create_repo(repo_id, body.get("visibility", "public") == "private" or bool(body.get("private")))
        self._json({"url": f"{self.base}/{repo_id}", "name": repo_id, "id": repo_id})

    def validate_yaml(self):
        error = front_matter_error(self._json_body().get("content", ""))
        if error:
            return self._json({"errors": [{"message": error}]}, 400)
        self._json({"warnings": []})

    def repo_info(self, repo_id: str, revision: str):
        repo = self._repo(repo_id)
        oid = self._commit(repo, revision or "main")
        files = repo.commits[oid]["files"]
        self._json({"id": repo_id, "modelId": repo_id, "sha": oid, "private": repo.private,
                    "siblings": [{"rfilename": p} for p in sorted(files)], "tags": []})

    def refs(self, repo_id: str):
        repo = self._repo(repo_id)
        self._json({"branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c}
                                 for n, c in repo.branches.items()], "converts": [], "tags": []})

    def tree(self, repo_id: str, rest: str, query: dict):
        repo = self._repo(repo_id)
        revision, _, folder = rest.partition("/")
        files = repo.commits[self._commit(repo, revision)]["files"]
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = unquote(folder).strip("/") + "/" if folder else ""
        entries, dirs = [], set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            relative = path[len(prefix):]
            parts = relative.split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    dirs.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append(files[path].tree_entry(path))
        entries += [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()} for d in sorted(dirs)]
        self._json(entries)

    def paths_info(self, repo_id: str, revision: str):
        repo = self._repo(repo_id)
        files = repo.commits[self._commit(repo, revision)]["files"]
        raw = self._body()
        try:
            paths = json.loads(raw).get("paths", [])
        except ValueError:
            paths = parse_qs(raw.decode()).get("paths", [])
        self._json([files[p].tree_entry(p) for p in paths if p in files])

    def create_branch(self, repo_id: str, branch: str):
        self._need_write()
        repo = self._repo(repo_id)
        branch = unquote(branch)
        if branch in repo.branches:
            raise HttpError(409, f"Branch {branch} already exists")
        start = self._json_body().get("startingPoint") or "main"
        repo.branches[branch] = self._commit(repo, start)
        self._json({})

    def preupload(self, repo_id: str, revision: str):
        self._need_write()
        repo = self._repo(repo_id)
        oid = repo.resolve(unquote(revision))
        existing = repo.commits[oid]["files"] if oid else {}
        result = []
        for item in self._json_body().get("files", []):
            lfs = item["path"].endswith(LFS_SUFFIXES) or item["size"] >= LFS_MIN_SIZE
            current = existing.get(item["path"])
            remote = (current.lfs_oid if lfs else git_blob_sha1(current.data)) if current else None
            result.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                           "oid": remote})
        self._json({"files": result, "commitOid": oid})

    def lfs_batch(self, repo_id: str):
        self._need_write()
        self._repo(repo_id)
        objects = []
        for item in self._json_body().get("objects", []):
            entry = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in self.state.blobs:
                entry["actions"] = {"upload": {"href": f"{self.base}/__lfs/{item['oid']}"},
                                    "verify": {"href": f"{self.base}/{repo_id}.git/info/lfs/objects/verify"}}
            objects.append(entry)
        self._json({"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_put(self, oid: str):
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise HttpError(400, "content does not match its sha256")
        self.state.blobs[oid] = data
        self._send(200)

    def lfs_verify(self, repo_id: str):
        self._need_write()
        body = self._json_body()
        blob = self.state.blobs.get(body.get("oid"))
        if blob is None or len(blob) != body.get("size"):
            raise HttpError(404, "object not found")
        self._json({"success": True})

    def commit(self, repo_id: str, revision: str):
        self._need_write()
        repo = self._repo(repo_id)
        parent = self._commit(repo, revision)
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HttpError(400, "first line must be the commit header")
        header = lines[0]["value"]
        if header.get("parentCommit") and not parent.startswith(header["parentCommit"]):
            raise HttpError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[parent]["files"])
        for line in lines[1:]:
            self._apply(files, line["key"], line["value"])
        readme = files.get("README.md")
        if readme is not None and (error := front_matter_error(readme.data.decode("utf-8", "replace"))):
            raise HttpError(400, f"Invalid metadata in README.md: {error}")
        oid = self.state.new_commit(repo, parent, files, header.get("summary", ""))
        repo.branches[unquote(revision)] = oid
        self._json({"commitUrl": f"{self.base}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True,
                    "pullRequestUrl": None})

    def _apply(self, files: dict[str, StoredFile], key: str, value: dict):
        path = value["path"]
        if key == "file":
            files[path] = StoredFile(base64.b64decode(value["content"]))
        elif key == "lfsFile":
            blob = self.state.blobs.get(value["oid"])
            if blob is None:
                raise HttpError(400, f"LFS object {value['oid']} for {path} was never uploaded")
            files[path] = StoredFile(blob, lfs_oid=value["oid"])
        elif key == "deletedFile":
            files.pop(path, None)
        elif key == "deletedFolder":
            for name in [n for n in files if n.startswith(path.rstrip("/") + "/")]:
                files.pop(name)
        else:
            raise HttpError(400, f"unsupported commit operation {key}")

    def resolve(self, repo_id: str, revision: str, path: str):
        repo = self._repo(repo_id)
        oid = self._commit(repo, revision)
        stored = repo.commits[oid]["files"].get(path)
        if stored is None:
            raise HttpError(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {"ETag": f'"{stored.etag}"', "X-Repo-Commit": oid}
        if stored.lfs_oid:
            headers.update({"X-Linked-Etag": f'"{stored.lfs_oid}"', "X-Linked-Size": str(len(stored.data))})
        self._send(200, stored.data, headers, content_type="application/octet-stream")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState


class HubServer:
    """Context manager: a loopback Hub on a free port; `.url` is its endpoint, `.state` its repositories."""

    def __init__(self, token: str | None = None):
        self.state = HubState(token)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.state = self.state
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
