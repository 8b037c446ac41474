"""A local stand-in for the Hugging Face Hub: a standard-library HTTP server on 127.0.0.1 that answers the endpoints
``huggingface_hub`` (2.x) uses to create a repository, upload files in one commit and download ``README.md``, and
records what it receives.

Endpoints (``<type>`` is ``models``):

- ``POST /api/repos/create``: creates ``<organization or "tester">/<name>``, answers its URL;
- ``POST /api/validate-yaml``: accepts any card metadata;
- ``POST /api/<type>/<repo>/preupload/<rev>``: every file in ``regular`` mode (content inline in the commit, no LFS);
- ``POST /api/<type>/<repo>/commit/<rev>``: NDJSON (a ``header`` line, then ``file`` lines with base64 content and
  ``deletedFile`` lines); the repository's files are updated and the commit recorded;
- ``GET`` / ``HEAD /<repo>/resolve/<rev>/<path>``: a committed file, or 404 with ``X-Error-Code: EntryNotFound``.

Anything else is answered 404 and recorded in ``unhandled``, so a test sees when the client starts using an endpoint
the double does not know. Used with ``HF_ENDPOINT=<double.url>`` in a subprocess.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class HubDouble:
    """The server and what it recorded: ``repos`` (repo id -> {path: bytes}), ``commits`` (dicts with ``repo``,
    ``summary``, ``files``), ``requests`` ((method, path) pairs) and ``unhandled``."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
                      headers: dict | None = None, head: bool = False) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, status: int, payload) -> None:
                self._send(status, json.dumps(payload).encode())

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    return self.rfile.read(length)
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return b""

            def do_POST(self):  # noqa: N802
                path = unquote(urlparse(self.path).path)
                body = self._body()
                with double.lock:
                    double.requests.append(("POST", path))
                    self._post(path, body)

            def _post(self, path: str, body: bytes) -> None:
                base = f"http://{self.headers['Host']}"
                if path == "/api/repos/create":
                    request = json.loads(body or b"{}")
                    repo_id = f"{request.get('organization') or 'tester'}/{request['name']}"
                    double.repos.setdefault(repo_id, {})
                    return self._json(200, {"url": f"{base}/{repo_id}", "name": repo_id})
                if path == "/api/validate-yaml":
                    return self._json(200, {"errors": [], "warnings": []})
                parts = path.split("/")
                if len(parts) >= 7 and parts[1] == "api" and parts[2] == "models" and parts[5] == "preupload":
                    files = json.loads(body)["files"]
                    return self._json(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                        for f in files]})
                if len(parts) >= 7 and parts[1] == "api" and parts[2] == "models" and parts[5] == "commit":
                    repo_id = f"{parts[3]}/{parts[4]}"
                    return self._commit(repo_id, body, base)
                double.unhandled.append(("POST", path))
                return self._json(404, {"error": f"hub double: unknown endpoint POST {path}"})

            def _commit(self, repo_id: str, body: bytes, base: str) -> None:
                if repo_id not in double.repos:
                    return self._send(404, b'{"error": "Repository not found"}',
                                      headers={"X-Error-Code": "RepoNotFound"})
                summary, files = None, {}
                for line in body.decode().splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if item["key"] == "header":
                        summary = item["value"].get("summary")
                    elif item["key"] == "file":
                        value = item["value"]
                        if value.get("encoding", "base64") != "base64":
                            raise ValueError(f"unexpected encoding {value.get('encoding')}")
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "deletedFile":
                        double.repos[repo_id].pop(item["value"]["path"], None)
                    else:
                        double.unhandled.append(("COMMIT", item["key"]))
                double.repos[repo_id].update(files)
                oid = hashlib.sha1(body).hexdigest()
                double.commits.append({"repo": repo_id, "summary": summary, "files": dict(files), "oid": oid})
                url = f"{base}/{repo_id}/commit/{oid}"
                return self._json(200, {"success": True, "commitOid": oid, "commitUrl": url, "pullRequestUrl": None})

            def _resolve(self, head: bool) -> None:
                path = unquote(urlparse(self.path).path)
                with double.lock:
                    double.requests.append(("HEAD" if head else "GET", path))
                    parts = path.strip("/").split("/")
                    if len(parts) >= 5 and parts[2] == "resolve":
                        repo_id, filename = f"{parts[0]}/{parts[1]}", "/".join(parts[4:])
                        data = double.repos.get(repo_id, {}).get(filename)
                        commit = next((c["oid"] for c in reversed(double.commits) if c["repo"] == repo_id), "0" * 40)
                        if data is None:
                            return self._send(404, b'{"error": "Entry not found"}', head=head,
                                              headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
                        etag = hashlib.sha1(data).hexdigest()
                        return self._send(200, data, content_type="application/octet-stream", head=head,
                                          headers={"ETag": f'"{etag}"', "X-Repo-Commit": commit})
                    double.unhandled.append(("HEAD" if head else "GET", path))
                    return self._send(404, b'{"error": "hub double: unknown endpoint"}', head=head)

            def do_GET(self):  # noqa: N802
                self._resolve(head=False)

            def do_HEAD(self):  # noqa: N802
                self._resolve(head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubDouble:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
