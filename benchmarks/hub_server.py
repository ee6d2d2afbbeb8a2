"""A local stand-in for the Hugging Face Hub on 127.0.0.1, for tests and benchmarks (stdlib ``http.server``).

It serves checkpoint folders with the endpoints that huggingface_hub 2.4 calls for a model repo:

* ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{revision}``: model info (``sha``, ``siblings``,
  with their ``size`` for ``?blobs=true``);
* ``HEAD`` and ``GET /{repo}/resolve/{revision}/{path}``: the file, with the headers ``hf_hub_download`` reads
  (``X-Repo-Commit``, ``ETag``, ``Content-Length``) and, unless ``ranges=False``, ``Accept-Ranges: bytes`` and
  ``Range`` requests answered with 206 and ``Content-Range``;
* with ``redirect=True``, ``*.safetensors`` resolve URLs answer 302 to ``/cdn/...`` with ``X-Linked-Size`` and
  ``X-Linked-Etag``, as the Hub does for LFS files (the storage URL serves the bytes and Range);
* errors as the Hub sends them (404 with ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``).

Every request is logged with the body bytes sent (:attr:`HubServer.log`). ``bandwidth`` (bytes/s) throttles the
server as a whole, like one shared link; ``drop_after`` closes the connection once that many body bytes have been
sent in all (once; then it serves normally again).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

CHUNK = 1 << 16


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    status: int
    sent: int = 0  # body bytes written
    started: float = 0.0  # time.monotonic() when the request line arrived
    authorization: str | None = None
    user_agent: str | None = None


def commit_of(repo_id: str, revision: str) -> str:
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


class HubServer:
    """``HubServer({"org/name": {"main": folder, ...}})``; use as a context manager; :attr:`endpoint` is its URL."""

    def __init__(self, repos: dict[str, dict[str, Path]], *, ranges: bool = True, bandwidth: float | None = None,
                 drop_after: int | None = None, redirect: bool = False):
        self.repos = {repo: {rev: Path(folder) for rev, folder in revs.items()} for repo, revs in repos.items()}
        self.ranges, self.bandwidth, self.drop_after, self.redirect = ranges, bandwidth, drop_after, redirect
        self.log: list[Request] = []
        self._lock = threading.Lock()
        self._sent_total = 0
        self._link_free_at = 0.0
        self._httpd = _QuietServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()

    # ----------------------------------------------------------------------------- bookkeeping

    def sent(self, predicate=lambda r: True) -> int:
        with self._lock:
            return sum(r.sent for r in self.log if predicate(r))

    def clear(self) -> None:
        with self._lock:
            self.log.clear()

    def resolve(self, repo_id: str, revision: str) -> tuple[str, Path] | None:
        """``(commit, folder)`` of a branch name or a commit of a served repo."""
        for rev, folder in self.repos.get(repo_id, {}).items():
            if revision in (rev, commit_of(repo_id, rev)):
                return commit_of(repo_id, rev), folder
        return None

    def _account(self, count: int) -> bool:
        """Record ``count`` body bytes about to be sent (throttled); False: drop the connection instead."""
        with self._lock:
            if self.drop_after is not None and self._sent_total + count > self.drop_after:
                self.drop_after = None
                return False
            self._sent_total += count
            wait_until = None
            if self.bandwidth:
                start = max(time.monotonic(), self._link_free_at)
                self._link_free_at = wait_until = start + count / self.bandwidth
        if wait_until is not None:
            time.sleep(max(0.0, wait_until - time.monotonic()))
        return True


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that hangs up (keep-alive, a dropped 200) is fine
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler(server: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go in separate writes: no 40 ms delayed-ACK stall each

        def log_message(self, *args):  # quiet
            pass

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _serve(self, body: bool):
            path = urlsplit(self.path).path
            self.record = Request(self.command, path, self.headers.get("Range"), 0, started=time.monotonic(),
                                  authorization=self.headers.get("Authorization"),
                                  user_agent=self.headers.get("User-Agent"))
            with server._lock:
                server.log.append(self.record)
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
                return self._model_info(unquote(m[1]), unquote(m[2] or "main"), body)
            if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                return self._file(unquote(m[1]), unquote(m[2]), unquote(m[3]), body, redirect=server.redirect)
            if m := re.fullmatch(r"/cdn/([^/]+/[^/]+)/([^/]+)/(.+)", path):
                return self._file(unquote(m[1]), unquote(m[2]), unquote(m[3]), body)
            self._error(404, "RepoNotFound", "not found", body)

        def _model_info(self, repo_id: str, revision: str, body: bool):
            if repo_id not in server.repos:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", body)
            found = server.resolve(repo_id, revision)
            if found is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
            commit, folder = found
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            blobs = parse_qs(urlsplit(self.path).query).get("blobs") in (["true"], ["True"])  # files_metadata: sizes
            info = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                    "siblings": [{"rfilename": str(p.relative_to(folder)), **({"size": p.stat().st_size} if blobs else {})}
                                 for p in files]}
            self._bytes(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)

        def _file(self, repo_id: str, revision: str, filename: str, body: bool, redirect: bool = False):
            found = server.resolve(repo_id, revision)
            if found is None:
                code = "RepoNotFound" if repo_id not in server.repos else "RevisionNotFound"
                return self._error(404, code, f"{repo_id}@{revision} not found", body)
            commit, folder = found
            file = folder / filename
            if not file.is_file():
                return self._error(404, "EntryNotFound", f"{filename} not found", body, {"X-Repo-Commit": commit})
            size = file.stat().st_size
            headers = {"X-Repo-Commit": commit, "ETag": f'"{_etag(file)}"', "Content-Type": "application/octet-stream"}
            if redirect and file.suffix == ".safetensors":  # as the Hub does for LFS files: off to the storage
                return self._bytes(302, b"", {**headers, "Location": f"/cdn/{repo_id}/{commit}/{filename}",
                                              "X-Linked-Size": str(size), "X-Linked-Etag": headers["ETag"]}, body)
            if server.ranges:
                headers["Accept-Ranges"] = "bytes"
            start, stop, status = 0, size, 200
            asked = self.headers.get("Range")
            if server.ranges and asked and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", asked)):
                start, stop = int(m[1]), min(size, int(m[2]) + 1 if m[2] else size)
                if start >= stop:
                    return self._bytes(416, b"", {"Content-Range": f"bytes */{size}"}, body)
                status = 206
                headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
            self.record.status = status
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(stop - start)}.items():
                self.send_header(key, value)
            self.end_headers()
            if not body:
                return
            with open(file, "rb") as fh:
                fh.seek(start)
                while start < stop:
                    chunk = fh.read(min(CHUNK, stop - start))
                    if not server._account(len(chunk)):
                        return self._drop()
                    try:
                        self.wfile.write(chunk)
                    except (BrokenPipeError, ConnectionResetError):  # the client stopped reading (e.g. a 200)
                        self.close_connection = True
                        return
                    self.record.sent += len(chunk)
                    start += len(chunk)

        def _drop(self):
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)

        def _error(self, status: int, code: str, message: str, body: bool, extra: dict | None = None):
            data = json.dumps({"error": message}).encode()
            self._bytes(status, data, {"X-Error-Code": code, "X-Error-Message": message,
                                       "Content-Type": "application/json", **(extra or {})}, body)

        def _bytes(self, status: int, data: bytes, headers: dict, body: bool):
            self.record.status = status
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(data)
                self.record.sent += len(data)

    return Handler


def _etag(file: Path) -> str:
    """A stable name for the file's content (hf_hub_download names the cached blob after it). Not the Hub's
    sha256 of the content: hashing a multi-GB shard on its first request would stall the server for seconds."""
    stat = file.stat()
    return hashlib.sha1(f"{file}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
