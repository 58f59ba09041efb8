"""An in-memory Hugging Face Hub that the real ``huggingface_hub`` client talks to in tests.

The server keeps model repos in memory: branches, commits with full file maps, and a private flag.
It serves the routes that ``HfApi``, ``hf_hub_download``, ``snapshot_download`` and
``PeftModel.from_pretrained`` call. These are repo create and delete, repo info, tree and paths
listing, preupload, NDJSON commits, commit and ref listing, branches, and ``resolve`` downloads with
HEAD and Range support. Tests program faults on :class:`HubState`: error statuses for the next
matching requests, downloads cut off mid-body, and a commit by another writer that moves a branch head.

Usage in a test module::

    from tests.hub_server import READ_TOKEN, WRITE_TOKEN, hub, hub_server  # noqa: F401  (fixtures)

    def test_upload(hub):
        api = hub.api()  # HfApi(endpoint=hub.url, token=WRITE_TOKEN)
        api.create_repo("tester/experts")
        hub.state.fail_next(r"/tree/", 503)

The ``hub`` fixture resets the state, gives the test its own ``HF_HOME`` and points the in-process
client at the server with :func:`use_hub`. ``huggingface_hub`` reads ``HF_ENDPOINT`` and ``HF_HOME``
once, when it is first imported, and ``tests/conftest.py`` imports it (through transformers) before
any port is known, so :func:`use_hub` patches the values the client already read instead.

Model repos only: dataset and space routes return 404 RepoNotFound. Every file is stored as a regular
git blob, because preupload always returns ``uploadMode: "regular"``, so no LFS or Xet transfer runs.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import logging
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.live_server import serve

WRITE_TOKEN = "hf_fake_write_token"
READ_TOKEN = "hf_fake_read_token"
DEFAULT_USER = "tester"

CONFLICT_MESSAGE = "A commit has happened since. Please refresh and try again."
INVALID_TOKEN_MESSAGE = "Invalid credentials in Authorization header"

# A new repo starts with one commit that adds a .gitattributes file, as on the Hub, whose file lists
# more LFS patterns than this one.
INITIAL_GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"

# Commit shas mix in this counter, so two commits with the same files and message never share a
# sha, even across resets. A shared HF cache therefore never serves a file from an earlier test.
_commit_serial = itertools.count()

_HTTP_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


# Git object ids


def git_blob_oid(content: bytes) -> str:
    """Return the git blob sha1 of ``content``, which the Hub uses as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def git_tree_oid(files: Mapping[str, bytes]) -> str:
    """Return the git tree sha1 of ``files``, a map of paths relative to the tree to contents."""
    children: dict[str, dict[str, bytes] | bytes] = {}
    for path, content in files.items():
        name, _, rest = path.partition("/")
        if rest:
            children.setdefault(name, {})[rest] = content  # type: ignore[index]
        else:
            children[name] = content
    entries = []
    for name, child in children.items():
        if isinstance(child, dict):
            # Git sorts a directory as if its name ended with "/".
            entries.append((name + "/", b"40000", name, git_tree_oid(child)))
        else:
            entries.append((name, b"100644", name, git_blob_oid(child)))
    body = b"".join(mode + b" " + name.encode() + b"\0" + bytes.fromhex(oid) for _, mode, name, oid in sorted(entries))
    return hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()


def _hub_time(moment: datetime) -> str:
    """Format ``moment`` the way the Hub does and ``huggingface_hub.utils.parse_datetime`` expects."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


# Stored objects


@dataclass(frozen=True)
class Commit:
    """One commit: its parent and the complete file map of the repo after it."""

    sha: str
    parent: str | None
    files: Mapping[str, bytes]
    title: str
    message: str
    author: str
    date: datetime


@dataclass
class Repo:
    """A model repo: branch heads and every commit reachable from them."""

    repo_id: str
    private: bool
    created_at: datetime
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """Return the commit a branch name or a full commit sha names, or None."""
        return self.commits.get(self.branches.get(revision, revision))

    def history(self, sha: str) -> Iterator[Commit]:
        """Yield the commit ``sha`` and its ancestors, newest first."""
        current: str | None = sha
        while current is not None:
            commit = self.commits[current]
            yield commit
            current = commit.parent


@dataclass(frozen=True)
class Token:
    """A token the server accepts.

    ``namespaces`` lists the namespaces whose private repos the token can read and whose repos it
    can write (with ``write``). None means every namespace.
    """

    user: str
    write: bool = True
    namespaces: frozenset[str] | None = None

    def can_access(self, namespace: str) -> bool:
        return self.namespaces is None or namespace == self.user or namespace in self.namespaces


@dataclass
class Fault:
    """A programmed error: the next ``remaining`` matching requests get ``status`` instead of being served."""

    method: str
    path: re.Pattern[str]
    status: int
    remaining: int
    message: str
    headers: dict[str, str]

    def matches(self, method: str, path: str) -> bool:
        return self.remaining > 0 and self.method in ("*", method) and self.path.search(path) is not None


@dataclass
class DroppedDownload:
    """A programmed cut-off: the next ``remaining`` matching downloads stop after ``after_bytes`` bytes of body.

    With ``after_bytes`` None the server sends half of the body it would send.
    """

    path: re.Pattern[str]
    remaining: int
    after_bytes: int | None


@dataclass(frozen=True)
class LoggedRequest:
    """One request the server handled. ``route`` names the handler, or is ``fault`` for an injected error."""

    method: str
    path: str
    query: str
    status: int
    route: str
    dropped: bool = False


class HubHTTPError(Exception):
    """An error response in the Hub's format: a JSON ``error`` body plus X-Error-Code and X-Error-Message."""

    def __init__(self, status: int, message: str, *, code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        headers = {"X-Error-Message": self.message, **self.headers}
        if self.code is not None:
            headers["X-Error-Code"] = self.code
        return JSONResponse({"error": self.message}, status_code=self.status, headers=headers)


# State


class HubState:
    """Repos, tokens, programmed faults and the request log of one fake Hub.

    Every method takes the state's lock, so tests may call them while the server thread serves
    requests. ``page_size`` caps the entries per page of tree and commit listings, and the Hub uses
    1000 for trees. Lower it to exercise the client's ``Link`` header pagination.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.reset()

    def reset(self) -> None:
        """Forget every repo, fault and logged request, and restore the default tokens."""
        with self.lock:
            self.repos: dict[str, Repo] = {}
            self.tokens: dict[str, Token] = {
                WRITE_TOKEN: Token(DEFAULT_USER, write=True),
                READ_TOKEN: Token(DEFAULT_USER, write=False),
            }
            self.faults: list[Fault] = []
            self.drops: list[DroppedDownload] = []
            self.pending_conflicts: dict[tuple[str, str], tuple[dict[str, bytes], str]] = {}
            self.log: list[LoggedRequest] = []
            self.page_size = 1000

    # Tokens

    def add_token(self, token: str, user: str, *, write: bool = True, namespaces: Iterable[str] | None = None) -> None:
        """Accept ``token`` as ``user``. With ``namespaces`` None it grants every namespace (see :class:`Token`)."""
        with self.lock:
            self.tokens[token] = Token(user, write=write, namespaces=None if namespaces is None else frozenset(namespaces))

    # Faults

    def fail_next(
        self,
        path: str,
        status: int,
        *,
        method: str = "*",
        times: int = 1,
        message: str | None = None,
        retry_after: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Fault:
        """Fail the next ``times`` requests whose decoded path matches the regex ``path`` with ``status``.

        ``method`` is an HTTP method or ``*``. ``retry_after`` adds a Retry-After header in seconds.
        The returned fault's ``remaining`` counts down as requests use it.
        """
        extra = dict(headers or {})
        if retry_after is not None:
            extra["Retry-After"] = str(retry_after)
        fault = Fault(method.upper(), re.compile(path), status, times, message or f"Injected error {status}", extra)
        with self.lock:
            self.faults.append(fault)
        return fault

    def drop_next_download(self, path: str = "", *, times: int = 1, after_bytes: int | None = None) -> DroppedDownload:
        """Send the headers and part of the body of the next ``times`` matching GET downloads, then close the connection.

        ``path`` is a regex searched in the decoded request path, and the default matches every download.
        """
        drop = DroppedDownload(re.compile(path), times, after_bytes)
        with self.lock:
            self.drops.append(drop)
        return drop

    def conflict_next_commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str] | None = None,
        *,
        branch: str = "main",
        message: str = "Commit by another writer",
    ) -> None:
        """Commit ``files`` to ``branch`` just before the server handles the next commit request to it.

        The head then moves under the client, so a commit that names the old head as
        ``parentCommit`` fails with 412. A commit without ``parentCommit`` lands on top, as on the Hub.
        """
        content = _as_bytes(files or {"other-writer.txt": f"written by another writer {next(_commit_serial)}\n"})
        with self.lock:
            self.pending_conflicts[(repo_id, branch)] = (content, message)

    # Request log

    def requests(self, *, method: str | None = None, path: str | None = None, route: str | None = None) -> list[LoggedRequest]:
        """Return the logged requests, oldest first, filtered by method, a regex on the path, and route name."""
        with self.lock:
            return [
                entry
                for entry in self.log
                if (method is None or entry.method == method.upper())
                and (path is None or re.search(path, entry.path))
                and (route is None or entry.route == route)
            ]

    def clear_log(self) -> None:
        with self.lock:
            self.log.clear()

    # Direct access for tests, bypassing HTTP

    def create_repo(self, repo_id: str, *, private: bool = False, files: Mapping[str, bytes | str] | None = None) -> str:
        """Create ``repo_id`` with the Hub's initial commit, commit ``files`` if given, and return the head sha."""
        namespace, _, name = repo_id.partition("/")
        if not namespace or not name or "/" in name:
            raise ValueError(f"repo id {repo_id!r} must be 'namespace/name'")
        with self.lock:
            if repo_id in self.repos:
                raise ValueError(f"repo {repo_id} already exists")
            repo = Repo(repo_id, private=private, created_at=datetime.now(timezone.utc))
            self.repos[repo_id] = repo
            self._add_commit(repo, "main", {".gitattributes": INITIAL_GITATTRIBUTES}, "initial commit", "", namespace)
            if files:
                return self.commit_files(repo_id, files, message="Add files")
            return repo.branches["main"]

    def commit_files(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str] | None = None,
        *,
        delete: Iterable[str] = (),
        branch: str = "main",
        message: str = "Update files",
        author: str = DEFAULT_USER,
    ) -> str:
        """Commit ``files`` (text is encoded as UTF-8), remove the paths in ``delete``, and return the new sha."""
        with self.lock:
            repo = self._repo(repo_id)
            head = repo.resolve(branch)
            if head is None:
                raise KeyError(f"branch {branch!r} not found in {repo_id}")
            new_files = dict(head.files)
            for path in delete:
                if path not in new_files:
                    raise KeyError(f"{path!r} not found in {repo_id}@{branch}")
                del new_files[path]
            new_files.update(_as_bytes(files or {}))
            return self._add_commit(repo, branch, new_files, message, "", author)

    def create_branch(self, repo_id: str, branch: str, *, revision: str = "main") -> str:
        """Create ``branch`` at ``revision`` and return its head sha."""
        with self.lock:
            repo = self._repo(repo_id)
            commit = repo.resolve(revision)
            if commit is None:
                raise KeyError(f"revision {revision!r} not found in {repo_id}")
            if branch in repo.branches:
                raise ValueError(f"branch {branch!r} already exists in {repo_id}")
            repo.branches[branch] = commit.sha
            return commit.sha

    def head(self, repo_id: str, branch: str = "main") -> str:
        """Return the commit sha at the head of ``branch``."""
        with self.lock:
            return self._repo(repo_id).branches[branch]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Return every file of ``repo_id`` at ``revision`` with its bytes."""
        with self.lock:
            commit = self._repo(repo_id).resolve(revision)
            if commit is None:
                raise KeyError(f"revision {revision!r} not found in {repo_id}")
            return dict(commit.files)

    def read_file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        """Return the bytes of ``path`` at ``revision``, or raise KeyError when it does not exist."""
        return self.files(repo_id, revision)[path]

    def commits(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """Return the commits reachable from ``branch``, newest first."""
        with self.lock:
            repo = self._repo(repo_id)
            return list(repo.history(repo.branches[branch]))

    # Internals used by the request handlers, which hold the lock while they call them.

    def _repo(self, repo_id: str) -> Repo:
        try:
            return self.repos[repo_id]
        except KeyError:
            raise KeyError(f"repo {repo_id} not found") from None

    def _add_commit(self, repo: Repo, branch: str, files: Mapping[str, bytes], title: str, message: str, author: str) -> str:
        parent = repo.branches.get(branch)
        digest = hashlib.sha1()
        digest.update(f"{parent}\0{title}\0{message}\0{next(_commit_serial)}\0".encode())
        digest.update(git_tree_oid(files).encode() if files else b"empty")
        commit = Commit(digest.hexdigest(), parent, dict(files), title, message, author, datetime.now(timezone.utc))
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        return commit.sha

    def _take_fault(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.matches(method, path):
                fault.remaining -= 1
                return fault
        return None

    def _take_drop(self, path: str) -> DroppedDownload | None:
        for drop in self.drops:
            if drop.remaining > 0 and drop.path.search(path):
                drop.remaining -= 1
                return drop
        return None


def _as_bytes(files: Mapping[str, bytes | str]) -> dict[str, bytes]:
    return {path: content.encode() if isinstance(content, str) else bytes(content) for path, content in files.items()}


# Access control


@dataclass(frozen=True)
class _Caller:
    """The token a request carried, or None for an anonymous request."""

    token: Token | None


def _authenticate(state: HubState, request: Request) -> _Caller:
    header = request.headers.get("authorization")
    if header is None:
        return _Caller(None)
    scheme, _, value = header.partition(" ")
    token = state.tokens.get(value.strip()) if scheme.lower() == "bearer" else None
    if token is None:
        # The client raises a plain HfHubHTTPError for this message, not RepositoryNotFoundError.
        raise HubHTTPError(401, INVALID_TOKEN_MESSAGE)
    return _Caller(token)


def _readable_repo(state: HubState, caller: _Caller, repo_id: str) -> Repo:
    """Return the repo if the caller may read it.

    Like the Hub, a missing repo and a private repo the caller cannot read look the same: 401 for an
    anonymous request and 404 for an authenticated one, both with X-Error-Code RepoNotFound.
    """
    repo = state.repos.get(repo_id)
    namespace = repo_id.partition("/")[0]
    visible = repo is not None and (not repo.private or (caller.token is not None and caller.token.can_access(namespace)))
    if not visible:
        status = 401 if caller.token is None else 404
        raise HubHTTPError(status, f"Repository not found: {repo_id}", code="RepoNotFound")
    assert repo is not None
    return repo


def _writable_repo(state: HubState, caller: _Caller, repo_id: str) -> Repo:
    repo = _readable_repo(state, caller, repo_id)
    _check_write(caller, repo_id.partition("/")[0], f"write to {repo_id}")
    return repo


def _check_write(caller: _Caller, namespace: str, action: str) -> Token:
    if caller.token is None:
        raise HubHTTPError(401, f"Authentication required to {action}: send a token with write access")
    if not caller.token.write:
        raise HubHTTPError(403, f"The token of {caller.token.user} is read-only and cannot {action}")
    if not caller.token.can_access(namespace):
        raise HubHTTPError(403, f"The token of {caller.token.user} has no access to namespace {namespace} and cannot {action}")
    return caller.token


def _resolve(repo: Repo, revision: str) -> Commit:
    commit = repo.resolve(revision)
    if commit is None:
        raise HubHTTPError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
    return commit


def _branch(repo: Repo, revision: str) -> str:
    """Return ``revision`` if it names a branch, because commits and preuploads need one."""
    if revision not in repo.branches:
        raise HubHTTPError(404, f"Branch not found: {revision} (commits go to an existing branch)", code="RevisionNotFound")
    return revision


# Handlers


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except json.JSONDecodeError as error:
        raise HubHTTPError(400, f"Invalid JSON body: {error}") from None
    if not isinstance(value, dict):
        raise HubHTTPError(400, "The JSON body must be an object")
    return value


def _flag(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


def _validate_path(path: object) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or path.endswith("/"):
        raise HubHTTPError(400, f"Invalid path in repo: {path!r}")
    if any(part in ("", ".", "..") for part in path.split("/")) or path.split("/")[0] == ".git":
        raise HubHTTPError(400, f"Invalid path in repo: {path!r}")
    return path


def _model_info(state: HubState, request: Request, repo_id: str, revision: str) -> Response:
    caller = _authenticate(state, request)
    repo = _readable_repo(state, caller, repo_id)
    commit = _resolve(repo, revision)

    with_blobs = _flag(request.query_params.get("blobs"))
    siblings = []
    for path in sorted(commit.files):
        sibling: dict[str, Any] = {"rfilename": path}
        if with_blobs:
            sibling.update(size=len(commit.files[path]), blobId=git_blob_oid(commit.files[path]))
        siblings.append(sibling)

    namespace = repo_id.partition("/")[0]
    info: dict[str, Any] = {
        "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
        "id": repo_id,
        "modelId": repo_id,
        "author": namespace,
        "sha": commit.sha,
        "private": repo.private,
        "gated": False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "createdAt": _hub_time(repo.created_at),
        "lastModified": _hub_time(commit.date),
        "siblings": siblings,
    }
    card_data = _card_data(commit.files.get("README.md"))
    if card_data is not None:
        info["cardData"] = card_data

    expand = request.query_params.getlist("expand")
    if expand:
        # Like the Hub, an expand list returns only the listed properties.
        info = {key: value for key, value in info.items() if key in expand or key in ("_id", "id")}
    return JSONResponse(info)


def _card_data(readme: bytes | None) -> dict[str, Any] | None:
    if readme is None:
        return None
    try:
        metadata = yaml.safe_load(_front_matter(readme.decode()) or "")
    except (UnicodeDecodeError, yaml.YAMLError):
        return None
    return metadata if isinstance(metadata, dict) else None


def _front_matter(text: str) -> str | None:
    """Return the YAML between a leading ``---`` line and the next ``---`` line, or None."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for index, line in enumerate(lines[1:], start=1):
        if line.strip() == "---":
            return "\n".join(lines[1:index])
    return None


def _validate_yaml(state: HubState, request: Request, body: bytes) -> Response:
    payload = _json_body(body)
    content = payload.get("content")
    if not isinstance(content, str):
        raise HubHTTPError(400, "The body must carry the README text in 'content'")
    front_matter = _front_matter(content)
    if front_matter is not None:
        try:
            metadata = yaml.safe_load(front_matter)
        except yaml.YAMLError as error:
            message = f"Invalid YAML in README.md: {error}"
            return JSONResponse({"error": message, "errors": [{"message": message}]}, status_code=400)
        if metadata is not None and not isinstance(metadata, dict):
            message = "The README.md metadata must be a YAML mapping"
            return JSONResponse({"error": message, "errors": [{"message": message}]}, status_code=400)
    return JSONResponse({})


def _whoami(state: HubState, request: Request) -> Response:
    caller = _authenticate(state, request)
    if caller.token is None:
        raise HubHTTPError(401, INVALID_TOKEN_MESSAGE)
    token = caller.token
    return JSONResponse(
        {
            "type": "user",
            "name": token.user,
            "fullname": token.user,
            "orgs": [],
            "auth": {
                "type": "access_token",
                "accessToken": {"displayName": "fake hub token", "role": "write" if token.write else "read"},
            },
        }
    )


def _create_repo(state: HubState, request: Request, body: bytes) -> Response:
    caller = _authenticate(state, request)
    payload = _json_body(body)
    if payload.get("type", "model") not in (None, "model"):
        raise HubHTTPError(400, f"The fake Hub stores model repos only, not {payload['type']} repos")
    name = payload.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise HubHTTPError(400, f"Invalid repo name: {name!r}")
    if caller.token is None:
        raise HubHTTPError(401, "Authentication required to create a repo")
    namespace = payload.get("organization") or caller.token.user
    repo_id = f"{namespace}/{name}"
    url = f"{str(request.base_url).rstrip('/')}/{repo_id}"
    _check_write(caller, namespace, f"create {repo_id}")
    if repo_id in state.repos:
        # create_repo(exist_ok=True) reads the url from this 409 body.
        return JSONResponse({"error": f"Repo {repo_id} already exists", "url": url}, status_code=409)
    private = payload.get("visibility") == "private" if "visibility" in payload else bool(payload.get("private", False))
    state.create_repo(repo_id, private=private)
    return JSONResponse({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})


def _delete_repo(state: HubState, request: Request, body: bytes) -> Response:
    caller = _authenticate(state, request)
    payload = _json_body(body)
    namespace = payload.get("organization") or (caller.token.user if caller.token else "")
    repo_id = f"{namespace}/{payload.get('name')}"
    _writable_repo(state, caller, repo_id)
    del state.repos[repo_id]
    return JSONResponse({})


def _tree(state: HubState, request: Request, repo_id: str, revision: str, path: str) -> Response:
    caller = _authenticate(state, request)
    repo = _readable_repo(state, caller, repo_id)
    commit = _resolve(repo, revision)
    recursive = _flag(request.query_params.get("recursive"))
    expand = _flag(request.query_params.get("expand"))
    prefix = f"{path}/" if path else ""
    below = {name[len(prefix) :]: content for name, content in commit.files.items() if name.startswith(prefix)}
    if path and not below:
        raise HubHTTPError(404, f"Folder not found: {path}", code="EntryNotFound", headers={"X-Repo-Commit": commit.sha})

    entries: dict[str, dict[str, Any]] = {}
    for relative in sorted(below):
        parts = relative.split("/")
        depth = len(parts) if recursive else 1
        for level in range(1, min(depth, len(parts) - 1) + 1):
            folder = prefix + "/".join(parts[:level])
            entries.setdefault(folder, _folder_entry(repo, commit, folder, expand))
        if recursive or len(parts) == 1:
            entries[prefix + relative] = _file_entry(repo, commit, prefix + relative, expand)
    listing = [entries[key] for key in sorted(entries)]

    start = int(request.query_params.get("cursor", "0"))
    page = listing[start : start + state.page_size]
    headers = {}
    if start + state.page_size < len(listing):
        headers["Link"] = _next_page_link(request, cursor=start + state.page_size)
    return JSONResponse(page, headers=headers)


def _next_page_link(request: Request, **replace: object) -> str:
    """Return a Link header pointing at this request's raw path with the query parameters in ``replace`` set."""
    raw_path = request.scope["raw_path"].decode("latin-1").split("?")[0]
    query = [(key, value) for key, value in request.query_params.multi_items() if key not in replace]
    query += [(key, str(value)) for key, value in replace.items()]
    return f'<{str(request.base_url).rstrip("/")}{raw_path}?{urlencode(query)}>; rel="next"'


def _file_entry(repo: Repo, commit: Commit, path: str, expand: bool) -> dict[str, Any]:
    content = commit.files[path]
    entry: dict[str, Any] = {"type": "file", "oid": git_blob_oid(content), "size": len(content), "path": path}
    if expand:
        entry["lastCommit"] = _last_commit(repo, commit, lambda files: git_blob_oid(files[path]) if path in files else None)
    return entry


def _folder_entry(repo: Repo, commit: Commit, path: str, expand: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "directory", "oid": _folder_oid(commit.files, path), "path": path}
    if expand:
        entry["lastCommit"] = _last_commit(repo, commit, lambda files: _folder_oid(files, path))
    return entry


def _folder_oid(files: Mapping[str, bytes], path: str) -> str | None:
    prefix = path + "/"
    inside = {name[len(prefix) :]: content for name, content in files.items() if name.startswith(prefix)}
    return git_tree_oid(inside) if inside else None


def _last_commit(repo: Repo, commit: Commit, oid_in: Callable[[Mapping[str, bytes]], str | None]) -> dict[str, str]:
    """Return the newest commit at or before ``commit`` that changed the entry ``oid_in`` identifies."""
    latest = commit
    for older in repo.history(commit.sha):
        if oid_in(older.files) != oid_in(commit.files):
            break
        latest = older
    return {"id": latest.sha, "title": latest.title, "date": _hub_time(latest.date)}


def _paths_info(state: HubState, request: Request, repo_id: str, revision: str, body: bytes) -> Response:
    caller = _authenticate(state, request)
    repo = _readable_repo(state, caller, repo_id)
    commit = _resolve(repo, revision)
    form = parse_qs(body.decode(), keep_blank_values=True)
    expand = _flag((form.get("expand") or ["false"])[0])
    result = []
    for path in form.get("paths", []):
        path = path.strip("/")
        if path in commit.files:
            result.append(_file_entry(repo, commit, path, expand))
        elif _folder_oid(commit.files, path) is not None:
            result.append(_folder_entry(repo, commit, path, expand))
    return JSONResponse(result)


def _preupload(state: HubState, request: Request, repo_id: str, revision: str, body: bytes) -> Response:
    caller = _authenticate(state, request)
    repo = _writable_repo(state, caller, repo_id)
    head = repo.commits[repo.branches[_branch(repo, revision)]]
    files = _json_body(body).get("files")
    if not isinstance(files, list):
        raise HubHTTPError(400, "The body must list the files to upload in 'files'")
    answer = []
    for item in files:
        path = _validate_path(item.get("path") if isinstance(item, dict) else None)
        existing = head.files.get(path)
        # The client skips a file whose oid matches the one it would upload.
        oid = None if existing is None else git_blob_oid(existing)
        answer.append({"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
    return JSONResponse({"files": answer, "commitOid": head.sha})


def _commit(state: HubState, request: Request, repo_id: str, revision: str, body: bytes) -> Response:
    caller = _authenticate(state, request)
    repo = _writable_repo(state, caller, repo_id)
    assert caller.token is not None
    if _flag(request.query_params.get("create_pr")):
        raise HubHTTPError(400, "The fake Hub does not support pull requests (create_pr)")
    branch = _branch(repo, revision)
    lines = [_json_line(line) for line in body.splitlines() if line.strip()]
    if not lines or lines[0].get("key") != "header":
        raise HubHTTPError(400, "The first NDJSON line of a commit must be the header")
    header = lines[0].get("value") or {}
    summary = header.get("summary")
    if not isinstance(summary, str) or not summary.strip():
        raise HubHTTPError(400, "The commit header needs a non-empty 'summary'")

    pending = state.pending_conflicts.pop((repo_id, branch), None)
    if pending is not None:
        files, message = pending
        state._add_commit(repo, branch, {**repo.commits[repo.branches[branch]].files, **files}, message, "", "other-writer")

    head = repo.commits[repo.branches[branch]]
    parent = header.get("parentCommit")
    # NOTE: a parentCommit shorter than 40 characters is compared as a prefix of the head sha.
    # How the real Hub handles short shas here is unverified.
    if parent is not None and not (isinstance(parent, str) and len(parent) >= 5 and head.sha.startswith(parent.lower())):
        raise HubHTTPError(412, CONFLICT_MESSAGE)

    files = dict(head.files)
    for line in lines[1:]:
        _apply_operation(files, line)
    sha = state._add_commit(repo, branch, files, summary, str(header.get("description") or ""), caller.token.user)
    base = str(request.base_url).rstrip("/")
    return JSONResponse(
        {"success": True, "commitOid": sha, "commitUrl": f"{base}/{repo_id}/commit/{sha}", "hookOutput": "", "pullRequestUrl": None}
    )


def _json_line(line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise HubHTTPError(400, f"Invalid NDJSON line in commit: {error}") from None
    if not isinstance(value, dict):
        raise HubHTTPError(400, "Every NDJSON line of a commit must be an object")
    return value


def _apply_operation(files: dict[str, bytes], line: dict[str, Any]) -> None:
    key, value = line.get("key"), line.get("value") or {}
    if key == "file":
        path = _validate_path(value.get("path"))
        if value.get("encoding") != "base64":
            raise HubHTTPError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}, expected base64")
        try:
            files[path] = base64.b64decode(value.get("content", ""), validate=True)
        except ValueError:
            raise HubHTTPError(400, f"Invalid base64 content for {path}") from None
    elif key == "deletedFile":
        path = _validate_path(value.get("path"))
        if path not in files:
            # The client looks for the phrase "A file with this name doesn't exist" to add a hint about folders.
            raise HubHTTPError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
        del files[path]
    elif key == "deletedFolder":
        path = _validate_path(str(value.get("path", "")).rstrip("/"))
        inside = [name for name in files if name.startswith(path + "/")]
        if not inside:
            raise HubHTTPError(404, f"Folder not found: {path}", code="EntryNotFound")
        for name in inside:
            del files[name]
    elif key == "lfsFile":
        raise HubHTTPError(400, "LFS files are not supported because the fake Hub stores every file as a regular blob")
    else:
        raise HubHTTPError(400, f"Unknown commit operation {key!r}")


def _list_commits(state: HubState, request: Request, repo_id: str, revision: str) -> Response:
    caller = _authenticate(state, request)
    repo = _readable_repo(state, caller, repo_id)
    commit = _resolve(repo, revision)
    listing = [
        {
            "id": entry.sha,
            "title": entry.title,
            "message": entry.message,
            "date": _hub_time(entry.date),
            "authors": [{"user": entry.author}],
        }
        for entry in repo.history(commit.sha)
    ]
    start = int(request.query_params.get("p", "0")) * state.page_size
    headers = {}
    if start + state.page_size < len(listing):
        headers["Link"] = _next_page_link(request, p=start // state.page_size + 1)
    return JSONResponse(listing[start : start + state.page_size], headers=headers)


def _refs(state: HubState, request: Request, repo_id: str) -> Response:
    caller = _authenticate(state, request)
    repo = _readable_repo(state, caller, repo_id)
    branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha} for name, sha in sorted(repo.branches.items())]
    refs: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
    if _flag(request.query_params.get("include_prs")):
        refs["pullRequests"] = []
    return JSONResponse(refs)


def _branch_route(state: HubState, request: Request, repo_id: str, branch: str, body: bytes) -> Response:
    caller = _authenticate(state, request)
    repo = _writable_repo(state, caller, repo_id)
    if request.method == "DELETE":
        _branch(repo, branch)
        if branch == "main":
            raise HubHTTPError(400, "The main branch cannot be deleted")
        del repo.branches[branch]
        return JSONResponse({})
    if branch in repo.branches:
        raise HubHTTPError(409, f"Branch {branch} already exists")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*", branch) or re.fullmatch(r"[0-9a-f]{40}", branch):
        raise HubHTTPError(400, f"Invalid branch name: {branch!r}")
    starting_point = _json_body(body).get("startingPoint") or "main"
    repo.branches[branch] = _resolve(repo, starting_point).sha
    return JSONResponse({})


def _resolve_file(state: HubState, request: Request, repo_id: str, revision: str, path: str) -> tuple[Response, bool]:
    """Serve a file download, and return the response and whether it cuts the body off."""
    caller = _authenticate(state, request)
    repo = _readable_repo(state, caller, repo_id)
    commit = _resolve(repo, revision)
    content = commit.files.get(path)
    if content is None:
        # The client caches the absence of the file under the commit named in X-Repo-Commit.
        raise HubHTTPError(404, f"Entry not found: {path}", code="EntryNotFound", headers={"X-Repo-Commit": commit.sha})
    headers = {
        "X-Repo-Commit": commit.sha,
        "ETag": f'"{git_blob_oid(content)}"',
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
    }
    if request.method == "HEAD":
        return Response(b"", headers={**headers, "Content-Length": str(len(content))}), False

    status, body = 200, content
    requested = request.headers.get("range")
    if requested is not None:
        span = _byte_range(requested, len(content))
        if span is None:
            raise HubHTTPError(416, f"Range not satisfiable: {requested}", headers={"Content-Range": f"bytes */{len(content)}"})
        start, end = span
        status, body = 206, content[start : end + 1]
        headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"

    drop = state._take_drop(request.url.path)
    if drop is not None:
        cut = len(body) // 2 if drop.after_bytes is None else min(drop.after_bytes, len(body))
        return _CutOffResponse(body, cut, status, headers), True
    return Response(body, status_code=status, headers=headers), False


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """Return the inclusive byte span a single-range Range header requests, or None if unsatisfiable."""
    match = _RANGE.fullmatch(header.strip())
    if match is None or not (match[1] or match[2]):
        return None
    if not match[1]:
        start, end = max(size - int(match[2]), 0), size - 1
    else:
        start = int(match[1])
        end = min(int(match[2]), size - 1) if match[2] else size - 1
    return (start, end) if start <= end and start < size else None


class _CutOffResponse(Response):
    """A response that announces the full Content-Length, sends ``cut`` bytes of the body, then stops.

    Returning from the ASGI call without the final body message makes uvicorn close the connection,
    so the client sees the peer close in the middle of the body.
    """

    def __init__(self, body: bytes, cut: int, status: int, headers: Mapping[str, str]) -> None:
        super().__init__(body, status_code=status, headers=dict(headers))
        self.cut = cut

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body[: self.cut], "more_body": True})


# Routing


def _route(state: HubState, request: Request, segments: list[str], body: bytes) -> tuple[str, Response, bool]:
    """Dispatch a request on its path segments, and return the route name, the response and whether it is cut off."""
    method = request.method
    if segments[:1] == ["api"]:
        return _route_api(state, request, segments[1:], body) + (False,)
    if segments[:1] in (["datasets"], ["spaces"]) and "resolve" in segments:
        raise HubHTTPError(404, "The fake Hub stores model repos only", code="RepoNotFound")
    if len(segments) >= 4 and segments[2] == "resolve" and method in ("GET", "HEAD"):
        repo_id, revision, path = f"{segments[0]}/{segments[1]}", segments[3], "/".join(segments[4:])
        response, cut_off = _resolve_file(state, request, repo_id, revision, path)
        return "resolve", response, cut_off
    return "unknown", JSONResponse({"error": f"Unknown route: {method} {request.url.path}"}, status_code=404), False


def _route_api(state: HubState, request: Request, segments: list[str], body: bytes) -> tuple[str, Response]:
    method = request.method
    simple = {
        ("GET", "whoami-v2"): ("whoami", lambda: _whoami(state, request)),
        # With telemetry on, huggingface_hub fetches this list once per process for its user agent.
        # use_hub turns telemetry off, so only clients outside it call this route.
        ("GET", "agent-harnesses"): ("agent_harnesses", lambda: JSONResponse({"standardEnvVars": [], "harnesses": {}})),
        ("POST", "validate-yaml"): ("validate_yaml", lambda: _validate_yaml(state, request, body)),
        ("POST", "repos/create"): ("create_repo", lambda: _create_repo(state, request, body)),
        ("DELETE", "repos/delete"): ("delete_repo", lambda: _delete_repo(state, request, body)),
    }
    handler = simple.get((method, "/".join(segments)))
    if handler is not None:
        name, call = handler
        return name, call()
    if segments[:1] in (["datasets"], ["spaces"]):
        raise HubHTTPError(404, "The fake Hub stores model repos only", code="RepoNotFound")
    if segments[:1] != ["models"] or len(segments) < 3:
        return "unknown", JSONResponse({"error": f"Unknown route: {method} {request.url.path}"}, status_code=404)

    repo_id, rest = f"{segments[1]}/{segments[2]}", segments[3:]
    action, arguments = (rest[0], rest[1:]) if rest else ("", [])
    if method == "GET" and not rest:
        return "model_info", _model_info(state, request, repo_id, "main")
    if method == "GET" and action == "revision" and len(arguments) == 1:
        return "model_info", _model_info(state, request, repo_id, arguments[0])
    if method == "GET" and action == "tree" and arguments:
        return "tree", _tree(state, request, repo_id, arguments[0], "/".join(arguments[1:]).strip("/"))
    if method == "POST" and action == "paths-info" and len(arguments) == 1:
        return "paths_info", _paths_info(state, request, repo_id, arguments[0], body)
    if method == "POST" and action == "preupload" and len(arguments) == 1:
        return "preupload", _preupload(state, request, repo_id, arguments[0], body)
    if method == "POST" and action == "commit" and len(arguments) == 1:
        return "commit", _commit(state, request, repo_id, arguments[0], body)
    if method == "GET" and action == "commits" and len(arguments) == 1:
        return "commits", _list_commits(state, request, repo_id, arguments[0])
    if method == "GET" and action == "refs" and not arguments:
        return "refs", _refs(state, request, repo_id)
    if method in ("POST", "DELETE") and action == "branch" and len(arguments) == 1:
        return "branch", _branch_route(state, request, repo_id, arguments[0], body)
    return "unknown", JSONResponse({"error": f"Unknown route: {method} {request.url.path}"}, status_code=404)


def create_app(state: HubState) -> Starlette:
    """Build the ASGI app that serves ``state``."""

    async def endpoint(request: Request) -> Response:
        body = await request.body()
        method, path = request.method, request.url.path
        # Parse the raw path: the client percent-encodes "/" inside revisions and tree paths.
        raw_path = request.scope.get("raw_path", path.encode()).decode("latin-1").split("?")[0]
        segments = [unquote(segment) for segment in raw_path.split("/")[1:]]
        cut_off = False
        with state.lock:
            fault = state._take_fault(method, path)
            if fault is not None:
                route = "fault"
                response: Response = HubHTTPError(fault.status, fault.message, headers=fault.headers).response()
            else:
                try:
                    route, response, cut_off = _route(state, request, segments, body)
                except HubHTTPError as error:
                    route, response = "error", error.response()
            state.log.append(LoggedRequest(method, path, request.url.query, response.status_code, route, cut_off))
        return response

    return Starlette(routes=[Route("/{path:path}", endpoint, methods=_HTTP_METHODS)])


# Running the server


@dataclass(frozen=True)
class RunningHub:
    """A fake Hub serving ``state`` at ``url``."""

    url: str
    state: HubState

    def api(self, token: str | bool | None = WRITE_TOKEN):
        """Return an ``HfApi`` for this Hub that sends ``token`` (WRITE_TOKEN unless given)."""
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.url, token=token)


class _IgnoreCutOffBodies(logging.Filter):
    """Hide uvicorn's error line for responses that :class:`_CutOffResponse` cuts off on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "returned without completing response" not in record.getMessage()


@contextlib.contextmanager
def serve_hub(state: HubState | None = None) -> Iterator[RunningHub]:
    """Serve a fake Hub on a free 127.0.0.1 port in a background thread; stop it on exit."""
    state = state or HubState()
    quiet = _IgnoreCutOffBodies()
    uvicorn_errors = logging.getLogger("uvicorn.error")
    uvicorn_errors.addFilter(quiet)
    try:
        with serve(create_app(state), timeout=30) as url:
            yield RunningHub(url, state)
    finally:
        uvicorn_errors.removeFilter(quiet)


class ForeignHostError(RuntimeError):
    """Raised when huggingface_hub sends a request anywhere but the fake Hub while :func:`use_hub` is active."""


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


@contextlib.contextmanager
def use_hub(url: str, home: Path) -> Iterator[None]:
    """Point ``huggingface_hub`` in this process at ``url``, with ``home`` as HF_HOME, and undo it on exit.

    The client reads HF_ENDPOINT, HF_HOME and the offline and Xet switches once, at import, into
    ``huggingface_hub.constants`` and a few module-level objects, so setting the environment later
    does not reach it. This patches, as read in huggingface_hub 2.4.0:

    - the endpoint: ``constants.ENDPOINT`` (read whenever an ``HfApi`` is built, for example by
      ``snapshot_download``), ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (``hf_hub_download`` URLs),
      ``huggingface_hub.hf_api.api.endpoint`` (the instance behind module-level functions such as
      ``huggingface_hub.file_exists``, which peft calls) and the ``HfApi`` that transformers caches
      in ``transformers.utils.hub._hf_api`` for ``push_to_hub``;
    - the cache and token paths under ``home``, offline mode off, Xet and telemetry off;
    - the environment (HF_ENDPOINT, HF_HOME, HF_HUB_DISABLE_XET, no HF_TOKEN), for child processes.

    The shared HTTP client is replaced by one that raises :class:`ForeignHostError` before sending
    a request to any other origin, so an ``HfApi`` built earlier with another endpoint fails loudly
    instead of reaching the network.
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    allowed = _origin(url)
    paths = {
        "HF_HOME": home,
        "HF_HUB_CACHE": home / "hub",
        "HUGGINGFACE_HUB_CACHE": home / "hub",
        "HF_ASSETS_CACHE": home / "assets",
        "HUGGINGFACE_ASSETS_CACHE": home / "assets",
        "HF_XET_CACHE": home / "xet",
        "HF_TOKEN_PATH": home / "token",
        "HF_STORED_TOKENS_PATH": home / "stored_tokens",
        "AGENT_HARNESSES_PATH": home / ".agent_harnesses.json",
        "CHECK_FOR_UPDATE_DONE_PATH": home / ".check_for_update_done",
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": home / ".check_for_skill_update_done",
    }

    def reject_other_hosts(request) -> None:
        if _origin(str(request.url)) != allowed:
            raise ForeignHostError(
                f"huggingface_hub sent {request.method} {request.url}, but tests may only reach the fake Hub at {url}. "
                "An HfApi or URL built before use_hub() still points elsewhere."
            )

    async def reject_other_hosts_async(request) -> None:
        reject_other_hosts(request)

    def guarded_client():
        client = _http.default_client_factory()
        client.event_hooks = {**client.event_hooks, "request": [*client.event_hooks["request"], reject_other_hosts]}
        return client

    def guarded_async_client():
        client = _http.default_async_client_factory()
        client.event_hooks = {**client.event_hooks, "request": [*client.event_hooks["request"], reject_other_hosts_async]}
        return client

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_ENDPOINT", url)
        patch.setenv("HF_HOME", str(home))
        patch.setenv("HF_HUB_DISABLE_XET", "1")
        patch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE",
                     "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH", "HF_XET_CACHE", "HF_ASSETS_CACHE"):
            patch.delenv(name, raising=False)

        patch.setattr(constants, "ENDPOINT", url)
        patch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        patch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {allowed[1]})
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        patch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        patch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        for name, path in paths.items():
            patch.setattr(constants, name, str(path))
        patch.setattr(hf_api.api, "endpoint", url)
        transformers_hub = sys.modules.get("transformers.utils.hub")
        if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
            patch.setattr(transformers_hub, "_hf_api", None)

        previous_factory = _http._GLOBAL_CLIENT_FACTORY
        previous_async_factory = _http._GLOBAL_ASYNC_CLIENT_FACTORY
        _http.set_client_factory(guarded_client)
        _http.set_async_client_factory(guarded_async_client)
        try:
            yield
        finally:
            # set_client_factory also closes the guarded client and its connections to this server.
            _http.set_client_factory(previous_factory)
            _http.set_async_client_factory(previous_async_factory)


# Fixtures. A test module imports both by name, and each importing module gets its own session-scoped
# server. Listing this module in ``pytest_plugins`` of tests/conftest.py would share one server instead.


@pytest.fixture(scope="session")
def hub_server() -> Iterator[RunningHub]:
    """One fake Hub for the whole test session. Tests normally use :func:`hub`, which empties it first."""
    with serve_hub() as running:
        yield running


@pytest.fixture
def hub(hub_server: RunningHub, tmp_path: Path) -> Iterator[RunningHub]:
    """The session's fake Hub, emptied, with the client pointed at it and HF_HOME in this test's tmp_path."""
    hub_server.state.reset()
    with use_hub(hub_server.url, tmp_path / "hf_home"):
        yield hub_server
