"""A loopback Hub endpoint that the real ``huggingface_hub`` client can publish to and download from.

No installable server accepts uploads from the client (see hf-integration.md), so this implements the
calls it makes: create repo, validate-yaml, preupload, ndjson commits (inline base64 files and LFS
files through the basic batch transfer, with ``HF_HUB_DISABLE_XET``), tags and refs, model info, tree
listing and ``resolve`` downloads with the metadata headers and Range support. Repositories live in
memory as a list of full-snapshot commits, so tags and old revisions resolve. Every request is
recorded, so a test can assert that nothing (or nothing more) reached the Hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt")
"""Files the server asks the client to send through LFS, like the Hub's default .gitattributes."""


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob, as the Hub reports for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    """One commit: a full snapshot of the repository's files (path -> bytes) and which are LFS."""

    oid: str
    message: str
    files: dict[str, bytes]
    lfs_paths: set[str]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def resolve(self, revision: str) -> Commit | None:
        """The commit a branch ("main"), tag or commit id names, or None."""
        if revision == "main":
            return self.head
        oid = self.tags.get(revision, revision)
        return next((commit for commit in self.commits if commit.oid == oid), None)


class LoopbackHub:
    """An in-memory Hub on ``http://127.0.0.1:<port>``; ``tokens`` are the accepted bearer tokens."""

    def __init__(self, tokens: tuple[str, ...] = ("hf_loopback_token",)):
        self.tokens = set(tokens)
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> LoopbackHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def commit_count(self, repo_id: str) -> int:
        """Commits in ``repo_id`` (the initial ``.gitattributes`` commit included); 0 if it does not exist."""
        repo = self.repos.get(repo_id)
        return len(repo.commits) if repo else 0


class _HubError(Exception):
    """An error answer: HTTP status, message and the ``X-Error-Code`` the client maps to an exception."""

    def __init__(self, status: int, message: str, error_code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code


def _make_handler(hub: LoopbackHub) -> type[BaseHTTPRequestHandler]:
    """A handler class bound to ``hub`` (http.server builds one handler instance per request)."""
    return type("LoopbackHubHandler", (_HubRequestHandler,), {"hub": hub})


class _HubRequestHandler(BaseHTTPRequestHandler):
    hub: LoopbackHub
    protocol_version = "HTTP/1.0"  # one request per connection: a stopped hub answers nothing more

    def log_message(self, format: str, *args) -> None:
        """Keep test output clean: no per-request line on stderr."""
        del format, args

    # -- plumbing -------------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.hub.requests.append((self.command, url.path))
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        try:
            with self.hub._lock:
                self._route(url.path)
        except _HubError as error:
            headers = {"X-Error-Code": error.error_code} if error.error_code else {}
            self._send_json({"error": error.message}, status=error.status, headers=headers)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, data: object, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _require_token(self) -> None:
        authorization = self.headers.get("Authorization", "")
        if authorization.removeprefix("Bearer ") not in self.hub.tokens:
            raise _HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        if write:
            self._require_token()
        repo = self.hub.repos.get(repo_id)
        if repo is not None and repo.private and not write:
            self._require_token()
        if repo is None:
            raise _HubError(404, f"Repository Not Found for url: {self.path}", "RepoNotFound")
        return repo

    @staticmethod
    def _commit(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(unquote(revision))
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # -- routes ---------------------------------------------------------------------------------------------
    def _route(self, path: str) -> None:
        parts = [unquote(part) for part in path.strip("/").split("/")]
        method = self.command
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo()
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml()
        if method == "PUT" and parts[0] == "lfs-upload":
            return self._lfs_put(parts[1])
        if method == "POST" and len(parts) == 6 and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{parts[0]}/{parts[1].removesuffix('.git')}")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, action, rest = f"{parts[2]}/{parts[3]}", parts[4] if len(parts) > 4 else "", parts[5:]
            routes = {
                ("GET", ""): lambda: self._model_info(repo_id, "main"),
                ("GET", "revision"): lambda: self._model_info(repo_id, "/".join(rest)),
                ("GET", "refs"): lambda: self._refs(repo_id),
                ("GET", "tree"): lambda: self._tree(repo_id, rest[0], "/".join(rest[1:])),
                ("POST", "preupload"): lambda: self._preupload(repo_id),
                ("POST", "commit"): lambda: self._apply_commit(repo_id, rest[0]),
                ("POST", "tag"): lambda: self._create_tag(repo_id, rest[0]),
            }
            if (method, action) in routes:
                return routes[method, action]()
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        raise _HubError(404, f"Not found: {method} {path}")

    def _create_repo(self) -> None:
        self._require_token()
        payload = json.loads(self.body)
        repo_id = (
            f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        )
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            return self._send_json({"error": "You already created this model repo", "url": url}, status=409)
        repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        gitattributes = "\n".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text" for suffix in LFS_SUFFIXES)
        repo.commits.append(
            Commit(
                uuid.uuid4().hex + "00000000",
                "initial commit",
                {".gitattributes": gitattributes.encode()},
                set(),
            )
        )
        self.hub.repos[repo_id] = repo
        self._send_json({"url": url, "name": repo_id})

    def _validate_yaml(self) -> None:
        """Reject README front matter that is not a YAML mapping, as the Hub does."""
        content = json.loads(self.body)["content"]
        if content.startswith("---\n"):
            try:
                metadata = yaml.safe_load(content[4 : content.index("\n---", 3)])
            except (ValueError, yaml.YAMLError) as error:
                metadata = f"unparsable: {error}"
            if metadata is not None and not isinstance(metadata, dict):
                message = f"README.md metadata must be a YAML mapping, got {metadata!r}"
                return self._send_json({"errors": [{"message": message}]}, status=400)
        self._send_json({"warnings": []})

    def _preupload(self, repo_id: str) -> None:
        self._repo(repo_id, write=True)
        files = json.loads(self.body)["files"]
        modes = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                "shouldIgnore": False,
            }
            for f in files
        ]
        self._send_json({"files": modes})

    def _lfs_batch(self, repo_id: str) -> None:
        self._repo(repo_id, write=True)
        objects = []
        for obj in json.loads(self.body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        self._send_json({"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str) -> None:
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise _HubError(400, "LFS object does not match its sha256 oid")
        self.hub.lfs_objects[oid] = self.body
        self._send(200, b"")

    def _apply_commit(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, write=True)
        parent = self._commit(repo, revision)
        if parent is not repo.head:
            raise _HubError(400, "Commits are accepted on the main branch only")
        files, lfs_paths = dict(parent.files), set(parent.lfs_paths)
        message = ""
        for line in self.body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                message = value["summary"]
            elif item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs_paths.discard(value["path"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.hub.lfs_objects:
                    raise _HubError(400, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = self.hub.lfs_objects[value["oid"]]
                lfs_paths.add(value["path"])
            elif item["key"] == "deletedFile":
                files.pop(value["path"], None)
                lfs_paths.discard(value["path"])
            else:
                raise _HubError(400, f"Unsupported commit operation {item['key']!r}")
        commit = Commit(uuid.uuid4().hex + "00000000", message, files, lfs_paths)
        repo.commits.append(commit)
        self._send_json(
            {
                "commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit.oid}",
                "commitOid": commit.oid,
                "pullRequestUrl": None,
            }
        )

    def _create_tag(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, write=True)
        commit = self._commit(repo, revision)
        tag = json.loads(self.body)["tag"]
        if tag in repo.tags:
            raise _HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = commit.oid
        self._send_json({})

    def _refs(self, repo_id: str) -> None:
        repo = self._repo(repo_id)
        self._send_json(
            {
                "branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": repo.head.oid}],
                "tags": [
                    {"name": tag, "ref": f"refs/tags/{tag}", "targetCommit": oid}
                    for tag, oid in repo.tags.items()
                ],
                "converts": [],
            }
        )

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        commit = self._commit(repo, revision)
        siblings = [{"rfilename": path} for path in sorted(commit.files)]
        self._send_json(
            {"id": repo_id, "sha": commit.oid, "private": repo.private, "siblings": siblings, "tags": []}
        )

    def _tree(self, repo_id: str, revision: str, folder: str) -> None:
        commit = self._commit(self._repo(repo_id), revision)
        recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{folder}/" if folder else ""
        entries, folders = [], set()
        for path in sorted(commit.files):
            if not path.startswith(prefix):
                continue
            relative = path[len(prefix) :]
            if "/" in relative:
                folders.add(prefix + relative.split("/")[0])
                if not recursive:
                    continue
            entries.append(self._tree_entry(commit, path))
        entries += [
            {"type": "directory", "oid": git_blob_oid(name.encode()), "size": 0, "path": name}
            for name in sorted(folders)
        ]
        self._send_json(entries)

    @staticmethod
    def _tree_entry(commit: Commit, path: str) -> dict:
        content = commit.files[path]
        entry = {"type": "file", "oid": git_blob_oid(content), "size": len(content), "path": path}
        if path in commit.lfs_paths:
            entry["lfs"] = {
                "oid": hashlib.sha256(content).hexdigest(),
                "size": len(content),
                "pointerSize": 134,
            }
        return entry

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        commit = self._commit(self._repo(repo_id), revision)
        if path not in commit.files:
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound")
        content = commit.files[path]
        headers = {
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
            "ETag": f'"{git_blob_oid(content)}"',
        }
        if path in commit.lfs_paths:
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(content).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(content))
        byte_range = self.headers.get("Range", "")
        if byte_range.startswith("bytes="):
            start_text, _, end_text = byte_range.removeprefix("bytes=").partition("-")
            start, end = int(start_text or 0), int(end_text) if end_text else len(content) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            return self._send(206, content[start : end + 1], headers)
        self._send(200, content, headers)
