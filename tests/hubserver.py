"""A tiny fake Hugging Face Hub on 127.0.0.1 for tests (no network).

It answers what ``huggingface_hub`` 2.4 calls for ``hf_hub_download`` and
``HfApi.list_models``:

* ``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}``: ``X-Repo-Commit``,
  ``ETag`` (plus ``X-Linked-Etag``/``X-Linked-Size`` for ``.safetensors`` and
  ``.bin`` files, as the Hub sends for LFS files) and ``Content-Length``. Errors
  carry the Hub's ``X-Error-Code`` (``RepoNotFound`` with 401, ``RevisionNotFound``
  and ``EntryNotFound`` with 404), which is how ``huggingface_hub`` picks its
  exception class. No ``X-Xet-*`` header is ever sent, so downloads stay plain
  HTTP even when ``hf_xet`` is installed.
* ``GET /api/models?search=&author=&filter=&sort=&limit=``: a JSON list of
  ``{"id", "downloads", "likes", "lastModified", "tags", ...}``, filtered and sorted.

Every request is logged in :attr:`FakeHub.requests` as ``(method, path)`` so a
test can check which files were fetched. Use it as a context manager::

    with FakeHub() as hub:
        hub.add_repo("org/name", {"adapter_config.json": b"{}"}, branches={"main"})
        ... HF_ENDPOINT=hub.url ...
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _sha1_hex(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


@dataclass
class FakeRepo:
    """One model repo: commits (sha → files) and refs (branch/tag → sha)."""

    repo_id: str
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    downloads: int = 0
    likes: int = 0
    tags: tuple[str, ...] = ()
    last_modified: str = "2026-01-01T00:00:00.000Z"


@dataclass(frozen=True)
class Request:
    """One logged request."""

    method: str
    path: str
    query: dict[str, list[str]]


class FakeHub:
    """A threaded HTTP server that behaves like the Hub for downloads and model search."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- data ---------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        branch: str = "main",
        downloads: int = 0,
        likes: int = 0,
        tags: tuple[str, ...] = ("peft", "safetensors"),
    ) -> str:
        """Create ``repo_id`` (or add a commit to it) with ``files`` on ``branch``; return the commit sha."""
        repo = self.repos.get(repo_id)
        if repo is None:
            repo = self.repos[repo_id] = FakeRepo(repo_id, downloads=downloads, likes=likes, tags=tuple(tags))
        payload = json.dumps({k: _sha1_hex(v) for k, v in sorted(files.items())}).encode() + repo_id.encode()
        sha = _sha1_hex(payload + str(len(repo.commits)).encode())
        repo.commits[sha] = dict(files)
        repo.refs[branch] = sha
        return sha

    def add_listing(self, repo_id: str, *, downloads: int = 0, likes: int = 0, tags: tuple[str, ...] = ()) -> None:
        """A repo that only shows up in search results (no files)."""
        self.repos[repo_id] = FakeRepo(repo_id, downloads=downloads, likes=likes, tags=tuple(tags))

    def file_requests(self, method: str | None = None) -> list[str]:
        """Filenames requested under ``/resolve/`` (optionally only ``method``), in order."""
        out = []
        for r in self.requests:
            if "/resolve/" in r.path and (method is None or r.method == method):
                out.append(r.path.split("/resolve/", 1)[1].split("/", 1)[1])
        return out

    # -- server -------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args) -> None:  # keep test output quiet
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def do_GET(self) -> None:
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- handlers -----------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, *, head: bool) -> None:
        parts = urlsplit(h.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        with self._lock:
            self.requests.append(Request("HEAD" if head else "GET", path, query))
        if path == "/api/models":
            return self._models(h, query, head)
        if "/resolve/" in path:
            return self._resolve(h, path, head)
        return self._send(h, 404, b'{"error": "Not Found"}', head, {"Content-Type": "application/json"})

    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes, head: bool, headers: dict[str, str]) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str, message: str, head: bool, extra=None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}
        headers.update(extra or {})
        self._send(h, status, json.dumps({"error": message}).encode(), head, headers)

    def _resolve(self, h: BaseHTTPRequestHandler, path: str, head: bool) -> None:
        repo_part, rest = path.lstrip("/").split("/resolve/", 1)
        revision, _, filename = rest.partition("/")
        repo = self.repos.get(repo_part)
        if repo is None or not repo.commits:
            # The Hub answers 401 for missing (or private) repos.
            return self._error(h, 401, "RepoNotFound", "Repository not found", head)
        sha = repo.refs.get(revision) or (revision if revision in repo.commits else None)
        if sha is None:
            return self._error(h, 404, "RevisionNotFound", "Invalid rev id: " + revision, head)
        files = repo.commits[sha]
        if filename not in files:
            return self._error(h, 404, "EntryNotFound", "Entry not found", head, {"X-Repo-Commit": sha})
        data = files[filename]
        headers = {"X-Repo-Commit": sha, "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if filename.endswith(_LFS_SUFFIXES):
            etag = hashlib.sha256(data).hexdigest()
            headers.update({"ETag": f'"{etag}"', "X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        else:
            headers["ETag"] = f'"{_sha1_hex(data)}"'
        self._send(h, 200, data, head, headers)

    def _models(self, h: BaseHTTPRequestHandler, query: dict[str, list[str]], head: bool) -> None:
        search = (query.get("search") or [""])[0].lower()
        author = (query.get("author") or [None])[0]
        filters = query.get("filter") or []
        limit = int((query.get("limit") or ["1000"])[0])
        rows = []
        for repo in self.repos.values():
            if search and search not in repo.repo_id.lower():
                continue
            if author and repo.repo_id.split("/")[0] != author:
                continue
            if any(f not in repo.tags for f in filters):
                continue
            rows.append(repo)
        if (query.get("sort") or [""])[0] == "downloads":
            rows.sort(key=lambda r: -r.downloads)
        body = [
            {
                "_id": _sha1_hex(r.repo_id.encode())[:24],
                "id": r.repo_id,
                "modelId": r.repo_id,
                "downloads": r.downloads,
                "likes": r.likes,
                "lastModified": r.last_modified,
                "createdAt": r.last_modified,
                "private": False,
                "tags": list(r.tags),
                "library_name": "peft",
            }
            for r in rows[:limit]
        ]
        self._send(h, 200, json.dumps(body).encode(), head, {"Content-Type": "application/json"})
