"""A Hugging Face Hub on 127.0.0.1 for tests, spoken to by the real huggingface_hub client (no mocking).

Two listeners, as on the real Hub: the HUB answers metadata (``HEAD /{repo}/resolve/{rev}/{file}`` with
``X-Repo-Commit``, ``X-Linked-Etag``, ``X-Linked-Size`` and a 302 to the CDN), the API routes (revision, tree,
refs, repo creation, preupload, commit) and errors with ``X-Error-Code``; the CDN (another port, so another
origin) serves the bytes, with ``Range`` support and injectable faults. Protocol: shared/reference/
hub-and-packaging.md §4.2, checked against huggingface_hub 2.4.0. Every request is logged, so tests can count
them (zero requests for a cached load).

The HUB also works as an HTTP proxy (it answers absolute-form requests by their path), to show that proxy settings
reach the client. Also: pytest fixtures ``fake_hub`` and ``hf_isolated`` (import them into a test module to use them).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

# httpx2 honours proxy variables and does not exempt localhost by itself.
for _var in ("NO_PROXY", "no_proxy"):
    os.environ[_var] = ",".join(filter(None, [os.environ.get(_var), "127.0.0.1", "localhost"]))

TOKEN = "hf_fake_test_token"


@dataclass
class Fault:
    """What the CDN does wrong, ``times`` times (then serves correctly; ``times=None``: always).

    kind: ``corrupt`` (same size, one byte flipped), ``truncate`` (a shorter body with a matching
    Content-Length), ``drop`` (full Content-Length announced, connection closed half way), ``stall`` (sends
    ``after`` bytes, then waits until ``release`` is set).
    """

    kind: str
    times: int | None = 1
    after: int | None = None
    release: threading.Event = field(default_factory=threading.Event)
    reached: threading.Event = field(default_factory=threading.Event)


@dataclass
class Request:
    server: str
    method: str
    path: str
    headers: dict


class FakeHub:
    """Repositories in memory, served over HTTP on 127.0.0.1."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.blobs: dict[str, bytes] = {}
        self.faults: dict[str, Fault] = {}
        self.log: list[Request] = []
        self.lock = threading.Lock()
        self._commits = 0
        self.hub = self._serve("hub")
        self.cdn = self._serve("cdn")
        self.url = f"http://127.0.0.1:{self.hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def _serve(self, role: str) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), type(f"{role}Handler", (_Handler,), {"fake": self,
                                                                                            "role": role}))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return server

    def close(self) -> None:
        for fault in self.faults.values():
            fault.release.set()
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()

    # ------------------------------------------------------------------ content

    def commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main", message: str = "",
               deleted: tuple[str, ...] = ()) -> str:
        """Add a commit on top of ``branch`` (created if needed) that writes ``files`` and removes ``deleted``;
        returns its 40-hex sha."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, {"commits": {}, "refs": {}, "tags": {}})
            parent = repo["refs"].get(branch)
            tree = {k: v for k, v in (repo["commits"][parent] if parent else {}).items() if k not in deleted}
            for path, data in files.items():
                digest = hashlib.sha256(data).hexdigest()
                self.blobs[digest] = data
                tree[path] = digest
            self._commits += 1
            sha = hashlib.sha1(f"{repo_id}|{parent}|{sorted(tree.items())}|{self._commits}|{message}".encode()) \
                .hexdigest()
            repo["commits"][sha] = tree
            repo["refs"][branch] = sha
            return sha

    def commit_folder(self, repo_id: str, folder: str | os.PathLike) -> str:
        """Serve every file under ``folder`` as one commit of ``repo_id``."""
        root = Path(folder)
        return self.commit(repo_id, {p.relative_to(root).as_posix(): p.read_bytes()
                                     for p in sorted(root.rglob("*")) if p.is_file()})

    def add_branch(self, repo_id: str, name: str, sha: str) -> None:
        self.repos[repo_id]["refs"][name] = sha

    def resolve(self, repo_id: str, revision: str) -> tuple[dict | None, str | None]:
        """(repo, commit sha) or (None, None) / (repo, None) when the repo / revision is unknown."""
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, None
        sha = repo["refs"].get(revision) or repo["tags"].get(revision)
        if sha is None and revision in repo["commits"]:
            sha = revision
        return repo, sha

    def requests(self, server: str | None = None, method: str | None = None) -> list[Request]:
        with self.lock:
            return [r for r in self.log if (server is None or r.server == server)
                    and (method is None or r.method == method)]

    def clear_log(self) -> None:
        with self.lock:
            self.log.clear()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeHub
    role: str

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _record(self) -> str:
        with self.fake.lock:
            self.fake.log.append(Request(self.role, self.command, self.path,
                                         {k.lower(): v for k, v in self.headers.items()}))
        return unquote(urlsplit(self.path).path)

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, code: str, message: str, headers: dict | None = None) -> None:
        self._json({"error": message}, 404, {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path = self._record()
        if self.role == "cdn" or path.startswith("/cdn/"):  # the latter when the HUB acts as an HTTP proxy
            return self._cdn(path)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(?:/.*)?", path):
            return self._api(m[1], m[2], m[3])
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)", path):
            return self._api(m[1], "revision", "main")
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/refs", path):
            repo = self.fake.repos.get(m[1])
            if repo is None:
                return self._error("RepoNotFound", "Repository not found")
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in repo["refs"].items()]
            tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in repo["tags"].items()]
            return self._json({"branches": branches, "converts": [], "tags": tags})
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._resolve(m[1], m[2], m[3])
        self._send(404)

    def _commit(self, repo_id: str, revision: str):
        """(repo, commit sha) of a revision, or None after answering with the Hub's error."""
        repo, sha = self.fake.resolve(repo_id, revision)
        if repo is None:
            return self._error("RepoNotFound", "Repository not found")
        if sha is None:
            return self._error("RevisionNotFound", f"Invalid rev id: {revision}")
        return repo, sha

    def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
        if (found := self._commit(repo_id, revision)) is None:
            return
        repo, sha = found
        digest = repo["commits"][sha].get(filename)
        if digest is None:
            return self._error("EntryNotFound", f"{filename} does not exist on {revision}", {"X-Repo-Commit": sha})
        self._send(302, headers={
            "X-Repo-Commit": sha, "ETag": f'"{digest}"', "X-Linked-Etag": f'"{digest}"',
            "X-Linked-Size": str(len(self.fake.blobs[digest])), "Location": f"{self.fake.cdn_url}/cdn/{digest}",
        })

    def _api(self, repo_id: str, kind: str, revision: str) -> None:
        if (found := self._commit(repo_id, revision)) is None:
            return
        repo, sha = found
        tree = repo["commits"][sha]
        if kind == "revision":
            return self._json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                               "siblings": [{"rfilename": name} for name in tree]})
        files = []
        for name, digest in tree.items():
            size = len(self.fake.blobs[digest])
            files.append({"type": "file", "path": name, "size": size,
                          "oid": hashlib.sha1(b"blob %d\0" % size + self.fake.blobs[digest]).hexdigest(),
                          "lfs": {"oid": digest, "size": size, "pointerSize": 134}})
        self._json(files)

    def _cdn(self, path: str) -> None:
        m = re.fullmatch(r"/cdn/([0-9a-f]{64})", path)
        data = self.fake.blobs.get(m[1]) if m else None
        if data is None:
            return self._send(404)
        start = 0
        if match := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
            start = int(match[1])
        fault = self.fake.faults.get(m[1])
        if fault is not None and self.command == "GET" and fault.times != 0:
            if fault.times is not None:
                fault.times -= 1
            return self._faulty(fault, data)
        status, headers = 200, {"Accept-Ranges": "bytes", "ETag": f'"{m[1]}"'}
        if start:
            status, headers["Content-Range"] = 206, f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send(status, data[start:], headers)

    def _faulty(self, fault: Fault, data: bytes) -> None:
        if fault.kind == "corrupt":
            bad = bytearray(data)
            bad[len(bad) // 2] ^= 0xFF
            return self._send(200, bytes(bad))
        if fault.kind == "truncate":
            return self._send(200, data[: len(data) // 2])
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        cut = len(data) // 2 if fault.after is None else fault.after
        self.wfile.write(data[:cut])
        self.wfile.flush()
        if fault.kind == "stall":
            fault.reached.set()
            fault.release.wait(60)
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def do_POST(self):
        path = self._record()
        body = self._body()
        if path == "/api/validate-yaml":
            return self._json({"errors": [], "warnings": []})
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._json({"error": "Invalid credentials in Authorization header"}, 401)
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in self.fake.repos:
                return self._json({"error": "You already created this model repo", "url": f"{self.fake.url}/"
                                   f"{repo_id}"}, 409)
            self.fake.repos[repo_id] = {"commits": {}, "refs": {}, "tags": {}}
            return self._json({"url": f"{self.fake.url}/{repo_id}", "name": repo_id})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
            if m[1] not in self.fake.repos:
                return self._error("RepoNotFound", "Repository not found")
            files = json.loads(body)["files"]
            return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in files]})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tag/([^/]+)", path):  # create_tag: a tag never moves
            if (found := self._commit(m[1], m[2])) is None:
                return
            repo, sha = found
            tag = json.loads(body)["tag"]
            if tag in repo["tags"]:
                return self._json({"error": f"Tag {tag} already exists"}, 409)
            repo["tags"][tag] = sha
            return self._json({})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
            if m[1] not in self.fake.repos:
                return self._error("RepoNotFound", "Repository not found")
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(item["value"] for item in lines if item["key"] == "header")
            files = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                     for item in lines if item["key"] == "file"}
            deleted = tuple(item["value"]["path"] for item in lines if item["key"] == "deletedFile")
            sha = self.fake.commit(m[1], files, branch=unquote(m[2]), message=header["summary"], deleted=deleted)
            return self._json({"commitUrl": f"{self.fake.url}/{m[1]}/commit/{sha}", "commitOid": sha,
                               "pullRequestUrl": None})
        self._send(404)


@pytest.fixture
def fake_hub():
    """A fresh fake Hub; huggingface_hub's HTTP session is reset around it (keep-alive connections die with it)."""
    import huggingface_hub

    huggingface_hub.close_session()
    hub = FakeHub()
    yield hub
    hub.close()
    huggingface_hub.close_session()


@pytest.fixture
def hf_isolated(tmp_path, monkeypatch):
    """huggingface_hub settings for in-process tests: no telemetry (it would call huggingface.co), no progress
    bars, online, and ``tmp_path/hf-cache`` as the default cache. huggingface_hub reads its environment at import
    time, so the constants are patched; subprocesses get the environment from ``cli_env``."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("UNISEG_HUB_MANIFEST", raising=False)
    return cache


def cli_env(hub: FakeHub | None, home: Path, **extra) -> dict:
    """Environment for a subprocess talking to ``hub``: set before huggingface_hub is imported there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "UNISEG_HUB_"))}
    env.update(HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               PYTHONUNBUFFERED="1")
    if hub is not None:
        env["HF_ENDPOINT"] = hub.url
    env.update({k: str(v) for k, v in extra.items()})
    return env


def manifest_with(path: Path, *entries: dict, endpoint: str | None = None) -> Path:
    """Write a manifest holding ``entries`` (and an endpoint, for in-process tests) to ``path``."""
    data = {"schema_version": 1, "models": list(entries)}
    if endpoint:
        data["endpoint"] = endpoint
    path.write_text(json.dumps(data, indent=2))
    return path


@pytest.fixture(scope="session")
def small_release(converted_small, tmp_path_factory):
    """(repository folder, manifest entry as JSON, without its revision) of the small converted model, built by
    ``publish(dry_run=True)`` without a MONAI bundle: what a test serves from the fake Hub."""
    from uniseg_hub.app.publish import publish
    from uniseg_hub.hub import packaged_manifest

    result = publish(converted_small, "test-org/uniseg-small", name="uniseg-small", bundle=False, dry_run=True,
                     out_dir=tmp_path_factory.mktemp("release") / "repo", manifest=packaged_manifest())
    return Path(result["folder"]), result["entry"].to_dict()


def serve(hub: FakeHub, release, manifest_path: Path, endpoint: bool = True, **changes) -> tuple[Path, dict]:
    """Commit ``release`` to ``hub`` and write a manifest whose entry pins that commit (``changes`` override the
    entry's fields); returns (manifest path, entry)."""
    folder, entry = release
    sha = hub.commit_folder(entry["repo_id"], folder)
    entry = {**entry, "revision": sha, **changes}
    return manifest_with(manifest_path, entry, endpoint=hub.url if endpoint else None), entry
