"""The registry's storage: namespaces, tokens, repos, commits, trees and refs in SQLite; file
contents in the content-addressed blob store of `hub.blobs`.

No web imports: the routes of `hub.routes` call these methods (never the blob store itself), and
`hub.server` maps the errors of `hub.errors` to HTTP. Every method that reads or writes a repo
takes the caller and applies `hub.accounts`' rules: a private repo the caller may not see is
`RepoNotFound` (as if it did not exist), a repo they see but may not change is `Forbidden`.

Atomicity: a commit first puts every new blob in place (each written to `tmp/` and renamed), then
records the commit, its tree and the branch move in one SQLite transaction that also checks the
branch head has not moved and that every LFS object it links is still stored (`hub gc` deletes
under the same write lock). A process killed before that transaction commits leaves the repo at
its previous commit; blobs nobody references are invisible until `hub gc` reclaims them.
"""

import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from hub.accounts import MEMBER_ROLES, TOKEN_ROLES, Caller, can_read
from hub.blobs import BlobStore, Upload
from hub.cards import field_problems, front_matter, readable
from hub.errors import (BadRequest, Conflict, EntryNotFound, Forbidden, NotSupported, PreconditionFailed, RepoNotFound,
                        RevisionNotFound, Unauthorized, refusing_a_full_disk)
from hub.objects import SHA1_HEX, SHA256_HEX, commit_oid, git_blob_sha1, is_repo_path, lfs_pointer, ref_name_problem

SCHEMA = """
CREATE TABLE IF NOT EXISTS repos (
    id INTEGER PRIMARY KEY, type TEXT NOT NULL DEFAULT 'model', namespace TEXT NOT NULL, name TEXT NOT NULL,
    private INTEGER NOT NULL, created_at TEXT NOT NULL, UNIQUE (type, namespace, name));
CREATE TABLE IF NOT EXISTS commits (
    oid TEXT PRIMARY KEY, repo_id INTEGER NOT NULL, parent TEXT, title TEXT NOT NULL, message TEXT NOT NULL,
    author TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tree_entries (
    commit_oid TEXT NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    git_oid TEXT NOT NULL, lfs INTEGER NOT NULL, PRIMARY KEY (commit_oid, path));
CREATE TABLE IF NOT EXISTS refs (
    repo_id INTEGER NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, commit_oid TEXT NOT NULL,
    message TEXT, PRIMARY KEY (repo_id, kind, name));
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY, name TEXT NOT NULL, user TEXT NOT NULL, role TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    org TEXT NOT NULL, user TEXT NOT NULL, role TEXT NOT NULL, PRIMARY KEY (org, user));
CREATE TABLE IF NOT EXISTS uploads (
    sha256 TEXT NOT NULL, user TEXT NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (sha256, user));
CREATE INDEX IF NOT EXISTS repos_by_visibility ON repos (type, private, namespace);
CREATE INDEX IF NOT EXISTS commits_by_repo ON commits (repo_id);
CREATE INDEX IF NOT EXISTS tree_entries_by_blob ON tree_entries (sha256);
CREATE INDEX IF NOT EXISTS members_by_user ON members (user);
"""
NAMESPACES = "CREATE TABLE namespaces (name TEXT PRIMARY KEY, kind TEXT NOT NULL, created_at TEXT NOT NULL)"

REPO_TYPES = ("model", "dataset")
RESERVED_NAMES = {"api", "datasets", "models", "spaces", "lfs", "organizations", "settings", "health", "buckets"}
NAME = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}\Z")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
DATASET_GITATTRIBUTES = GITATTRIBUTES + b"*.parquet filter=lfs diff=lfs merge=lfs -text\n*.arrow filter=lfs diff=lfs merge=lfs -text\n"


def now() -> str:
    """UTC with a trailing Z and milliseconds: the only date form the client parses."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Repo:
    id: int
    type: str  # one of REPO_TYPES
    namespace: str
    name: str
    private: bool
    created_at: str

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def url_path(self) -> str:
        """Where the repo's pages and files live under the registry's URL (`datasets/` first for a dataset)."""
        return self.repo_id if self.type == "model" else f"{self.type}s/{self.repo_id}"


@dataclass(frozen=True)
class RefMoved:
    """A branch or tag that moved, told to `Registry.ref_listeners` once its transaction committed."""

    repo: Repo
    action: str  # "update" (a commit to a branch), "create" or "delete" (a branch or tag)
    ref: str  # refs/heads/NAME or refs/tags/NAME
    old: str | None  # the commit it pointed at before; None for a new ref
    new: str | None  # the commit it points at now; None for a deleted ref


@dataclass(frozen=True)
class ListedRepo:
    """A repo as a listing shows it: with the head of main and its README's blob, in one query."""

    repo: Repo
    head: "Commit"
    readme: "FileEntry | None"


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    author: str
    created_at: str


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str
    git_oid: str  # git blob sha1 of the content, or of the LFS pointer for LFS files
    lfs: bool


@dataclass(frozen=True)
class AddFile:
    path: str
    data: bytes | None = None  # inline content, or
    sha256: str | None = None  # an uploaded LFS object (its size: given, or the stored object's)
    size: int | None = None


@dataclass(frozen=True)
class DeletePath:
    path: str
    folder: bool = False


def check_path(path: str) -> str:
    """A repo file (or, with a trailing `/`, folder) path that cannot escape anything (`is_repo_path`)."""
    if not is_repo_path(path, folder=True):
        raise BadRequest(f"invalid file path {path!r}: use a relative path without '..' segments")
    return path


def is_name(part) -> bool:
    """Whether `part` is a valid namespace or repo name: ASCII letters, digits, '-', '_', '.', at
    most 96 characters, no '--' or '..', not ending in '.git'."""
    return (isinstance(part, str) and bool(NAME.match(part)) and part.isascii() and "--" not in part
            and ".." not in part and not part.endswith(".git"))


def check_name(name: str, what: str) -> str:
    """A user or organisation name (`is_name`), and not a word the registry's URLs use
    (`datasets/alice/x` must stay a dataset)."""
    if not is_name(name):
        raise BadRequest(f"invalid {what} {name!r}: use letters, digits, '-', '_' and '.' (at most 96, no '--' or '..')")
    if name.lower() in RESERVED_NAMES:
        raise BadRequest(f"{name!r} is reserved by the registry's URLs; choose another {what}")
    return name


def check_repo_name(namespace: str, name: str) -> None:
    if not (is_name(namespace) and is_name(name)):
        raise BadRequest(f"invalid repo id {namespace}/{name!s}: use namespace/name with letters, digits, '-', '_', '.'")


def check_ref_name(name: str, kind: str) -> str:
    """A branch or tag name that resolves to itself only (`hub.objects.ref_name_problem`)."""
    problem = ref_name_problem(name, kind)
    if problem:
        raise BadRequest(problem)
    return name


def check_repo_type(repo_type: str) -> str:
    if repo_type == "space":
        raise NotSupported("Spaces are not supported by this registry: it stores model and dataset repos")
    if repo_type not in REPO_TYPES:
        raise BadRequest(f"invalid repo type {repo_type!r}: use model or dataset")
    return repo_type


class Registry:
    def __init__(self, root: Path, max_file_size: int = 5 * 2**30):
        self.root = Path(root)
        self._blobs = BlobStore(self.root, max_file_size)
        self.db_path = self.root / "registry.sqlite"
        self._cards: dict[str, dict] = {}  # README sha256 -> front matter
        self._local = threading.local()  # one SQLite connection per thread
        self.ref_listeners: list[Callable[[RefMoved], None]] = []  # each must return at once (`hub.delivery`)
        with self._db(write=True) as db:
            _migrate(db)
            db.execute("INSERT OR IGNORE INTO settings VALUES ('upload_secret', ?)", (secrets.token_hex(32),))
            self.upload_secret = db.execute("SELECT value FROM settings WHERE key='upload_secret'").fetchone()[0].encode()

    @contextlib.contextmanager
    def _db(self, write: bool = False):
        """This thread's connection; with `write`, inside one `BEGIN IMMEDIATE` transaction, rolled
        back on any error (a full disk is raised as `InsufficientStorage`, after the rollback)."""
        with refusing_a_full_disk():
            db = getattr(self._local, "db", None)
            if db is None:
                db = self._local.db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
                db.row_factory = sqlite3.Row
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
            try:
                if write:
                    db.execute("BEGIN IMMEDIATE")
                yield db
                if write:
                    db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def database(self, write: bool = False):
        """`_db`, for the stores that keep their own tables in the registry's database (`hub.webhooks`)."""
        return self._db(write)

    def _moved(self, repo: Repo, action: str, ref: str, old: str | None, new: str | None) -> None:
        """Tell the listeners a ref moved (called after the transaction that moved it committed)."""
        for listener in self.ref_listeners:
            try:
                listener(RefMoved(repo, action, ref, old, new))
            except Exception:  # the move is done: a listener's failure must not read as the request's
                logging.getLogger(__name__).exception("a listener failed on %s %s of %s", action, ref, repo.repo_id)

    # --- namespaces and tokens ----------------------------------------------------------------

    def add_user(self, name: str) -> bool:
        """Add a user; False when it exists already.

        Raises:
            BadRequest: an invalid name, or an organisation of that name.
        """
        return self._add_namespace(check_name(name, "user name"), "user")

    def add_org(self, org: str, members: list[tuple[str, str]] = ()) -> bool:
        """Add an organisation (False when it exists already) and set the role of each (user, role).

        Raises:
            BadRequest: an invalid name, a user of that name, an unknown member or role.
        """
        created = self._add_namespace(check_name(org, "organisation name"), "org")
        with self._db(write=True) as db:
            for user, role in members:
                if role not in MEMBER_ROLES:
                    raise BadRequest(f"member role {role!r} must be one of {', '.join(MEMBER_ROLES)}")
                if _kind(db, user) != "user":
                    raise BadRequest(f"{user!r} is not a user of this registry: add it with `loradock hub user add {user}`")
                db.execute("INSERT OR REPLACE INTO members VALUES (?, ?, ?)", (org, user, role))
        return created

    def remove_member(self, org: str, user: str) -> None:
        with self._db(write=True) as db:
            if db.execute("DELETE FROM members WHERE org = ? AND user = ?", (org, user)).rowcount == 0:
                raise BadRequest(f"{user!r} is not a member of {org!r}")

    def remove_user(self, name: str) -> int:
        """Remove a user, its tokens (they stop working at once) and its memberships; returns how
        many tokens were revoked. Its repos stay, for an admin to move or delete.

        Raises:
            BadRequest: there is no such user.
        """
        with self._db(write=True) as db:
            if _kind(db, name) != "user":
                raise BadRequest(f"there is no user {name!r} (see `loradock hub user list`)")
            revoked = db.execute("DELETE FROM tokens WHERE user = ?", (name,)).rowcount
            db.execute("DELETE FROM members WHERE user = ?", (name,))
            db.execute("DELETE FROM namespaces WHERE name = ?", (name,))
        return revoked

    def namespaces(self) -> list[dict]:
        """Every user and organisation, with the members of each organisation."""
        with self._db() as db:
            rows = db.execute("SELECT * FROM namespaces ORDER BY kind DESC, name").fetchall()
            members = db.execute("SELECT * FROM members ORDER BY org, user").fetchall()
        return [{"name": r["name"], "kind": r["kind"], "created_at": r["created_at"],
                 "members": {m["user"]: m["role"] for m in members if m["org"] == r["name"]}} for r in rows]

    def _add_namespace(self, name: str, kind: str) -> bool:
        with self._db(write=True) as db:
            existing = _kind(db, name)
            if existing is not None and existing != kind:
                raise BadRequest(f"{name!r} is already {'a user' if existing == 'user' else 'an organisation'}; "
                                 "users and organisations share one namespace")
            if existing is None:
                db.execute("INSERT INTO namespaces VALUES (?, ?, ?)", (name, kind, now()))
        return existing is None

    def create_token(self, name: str, user: str, role: str = "write") -> str:
        """A new token for `user` (added when missing), printed once: only its sha256 is stored."""
        if role not in TOKEN_ROLES:
            raise BadRequest(f"token role {role!r} must be one of {', '.join(TOKEN_ROLES)}")
        self.add_user(user)
        token = "hf_" + secrets.token_urlsafe(30)
        with self._db(write=True) as db:
            db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?)", (_hash(token), name, user, role, now()))
        return token

    def authenticate(self, token: str | None) -> Caller | None:
        """The caller a token stands for; None without a token. An unknown token, or one of a user
        since removed, is an error, not anonymity."""
        if not token:
            return None
        digest = _hash(token)
        with self._db() as db:
            row = db.execute("SELECT t.hash, t.user, t.role FROM tokens t JOIN namespaces n ON n.name = t.user "
                             "AND n.kind = 'user' WHERE t.hash = ?", (digest,)).fetchone()
            orgs = {} if row is None else {m["org"]: m["role"] for m in db.execute(
                "SELECT org, role FROM members WHERE user = ?", (row["user"],))}
        if row is None or not hmac.compare_digest(row["hash"], digest):
            raise Unauthorized("Invalid credentials in Authorization header")
        return Caller(row["user"], row["role"], orgs)

    @staticmethod
    def require_write(caller: Caller | None) -> Caller:
        if caller is None:
            raise Unauthorized("a write token is needed: create one with `loradock hub token create`")
        if not caller.can_write:
            raise Forbidden(f"the token of {caller.user} is read-only; use a write token")
        return caller

    def require_writer(self, caller: Caller | None, repo: Repo) -> Caller:
        """The caller, if they may change `repo` (whose visibility `get_repo` already checked)."""
        caller = self.require_write(caller)
        if not caller.writes(repo.namespace):
            raise Forbidden(f"{caller.user} may not write to {repo.repo_id}: only {repo.namespace} "
                            "and its members with write access can")
        return caller

    # --- repos --------------------------------------------------------------------------------

    def create_repo(self, caller: Caller | None, repo_type: str, namespace: str, name: str, private: bool) -> Repo:
        caller = self.require_write(caller)
        check_repo_type(repo_type)
        check_repo_name(namespace, name)
        if not caller.writes(namespace):
            raise Forbidden(f"{caller.user} may not create a repo in {namespace}: create it in your own namespace "
                            f"({caller.user}/...) or in an organisation where you have write access")
        gitattributes = GITATTRIBUTES if repo_type == "model" else DATASET_GITATTRIBUTES
        sha = self._blobs.put(gitattributes)
        with self._db(write=True) as db:
            if _kind(db, namespace) is None:
                raise BadRequest(f"there is no user or organisation {namespace!r} in this registry: "
                                 f"add it with `loradock hub user add {namespace}`")
            try:
                cur = db.execute("INSERT INTO repos (type, namespace, name, private, created_at) VALUES (?, ?, ?, ?, ?)",
                                 (repo_type, namespace, name, int(private), now()))
            except sqlite3.IntegrityError:
                raise Conflict(f"{repo_type} repo {namespace}/{name} already exists") from None
            entry = FileEntry(".gitattributes", len(gitattributes), sha, git_blob_sha1(gitattributes), False)
            oid = self._insert_commit(db, cur.lastrowid, None, [entry], caller.user, "initial commit", "")
            db.execute("INSERT INTO refs (repo_id, kind, name, commit_oid) VALUES (?, 'branch', 'main', ?)",
                       (cur.lastrowid, oid))
        return self.get_repo(caller, repo_type, f"{namespace}/{name}")

    def delete_repo(self, caller: Caller | None, repo_type: str, repo_id: str) -> None:
        repo = self.get_repo(self.require_write(caller), repo_type, repo_id)
        self.require_writer(caller, repo)
        with self._db(write=True) as db:
            db.execute("DELETE FROM tree_entries WHERE commit_oid IN (SELECT oid FROM commits WHERE repo_id = ?)", (repo.id,))
            for table in ("commits", "refs"):
                db.execute(f"DELETE FROM {table} WHERE repo_id = ?", (repo.id,))
            db.execute("DELETE FROM repos WHERE id = ?", (repo.id,))

    def get_repo(self, caller: Caller | None, repo_type: str, repo_id: str) -> Repo:
        """The repo, if it exists and the caller may see it; a private repo they may not see is not found."""
        check_repo_type(repo_type)
        namespace, _, name = repo_id.partition("/")
        with self._db() as db:
            row = db.execute("SELECT * FROM repos WHERE type = ? AND namespace = ? AND name = ?",
                             (repo_type, namespace, name)).fetchone()
        if row is None or not can_read(caller, row["namespace"], bool(row["private"])):
            kind = "" if repo_type == "model" else f"{repo_type} "
            raise RepoNotFound(f"Repository Not Found for url: {kind}{repo_id}")
        return _repo(row)

    def list_repos(self, caller: Caller | None, repo_type: str, search: str = "", author: str = "",
                   order: str = "modified", offset: int = 0, limit: int = -1) -> list[ListedRepo]:
        """The repos of a type this caller may see, newest first (by the head of main, or with
        `order="created"` by creation), each with the head of main and its README entry.
        Visibility, author, search and the window (offset, limit) are all in the query."""
        check_repo_type(repo_type)
        where, params = ["r.type = ?"], [repo_type]
        if caller is None or not caller.admin:
            visible = caller.readable_namespaces() if caller else []
            where.append(f"(r.private = 0 OR r.namespace IN ({', '.join('?' * len(visible)) or 'NULL'}))")
            params += visible
        if author:
            where.append("r.namespace = ?")
            params.append(author)
        if search:
            where.append("instr(lower(r.namespace || '/' || r.name), ?) > 0")
            params.append(search.lower())
        with self._db() as db:
            rows = db.execute(
                "SELECT r.*, c.oid AS c_oid, c.parent AS c_parent, c.title AS c_title, c.message AS c_message, "
                "c.author AS c_author, c.created_at AS c_created_at, t.path AS t_path, t.size AS t_size, "
                "t.sha256 AS t_sha256, t.git_oid AS t_git_oid, t.lfs AS t_lfs "
                "FROM repos r JOIN refs f ON f.repo_id = r.id AND f.kind = 'branch' AND f.name = 'main' "
                "JOIN commits c ON c.oid = f.commit_oid "
                "LEFT JOIN tree_entries t ON t.commit_oid = c.oid AND t.path = 'README.md' "
                f"WHERE {' AND '.join(where)} ORDER BY {'r.created_at' if order == 'created' else 'c.created_at'} DESC, "
                "r.namespace, r.name LIMIT ? OFFSET ?", (*params, limit, offset)).fetchall()
        return [ListedRepo(_repo(row), _commit(row, "c_"), _entry(row, "t_") if row["t_path"] else None) for row in rows]

    def repos_of(self, caller: Caller | None, namespace: str) -> list[tuple[Repo, Commit, int]]:
        """Every repo of `namespace` the caller may see, with the head of main and the bytes its
        files take (each distinct blob of every commit once): what `hf repos ls` shows.

        Raises:
            RepoNotFound: there is no such user or organisation.
        """
        with self._db() as db:
            if _kind(db, namespace) is None:
                raise RepoNotFound(f"there is no user or organisation {namespace!r} in this registry")
            rows = db.execute(
                "SELECT r.*, c.oid AS c_oid, c.parent AS c_parent, c.title AS c_title, c.message AS c_message, "
                "c.author AS c_author, c.created_at AS c_created_at, (SELECT COALESCE(SUM(size), 0) FROM "
                "(SELECT DISTINCT t.sha256, t.size FROM tree_entries t JOIN commits k ON k.oid = t.commit_oid "
                "WHERE k.repo_id = r.id)) AS storage "
                "FROM repos r JOIN refs f ON f.repo_id = r.id AND f.kind = 'branch' AND f.name = 'main' "
                "JOIN commits c ON c.oid = f.commit_oid WHERE r.namespace = ? ORDER BY r.type, r.name",
                (namespace,)).fetchall()
        return [(_repo(row), _commit(row, "c_"), row["storage"]) for row in rows
                if can_read(caller, row["namespace"], bool(row["private"]))]

    def update_settings(self, caller: Caller | None, repo: Repo, private: bool | None) -> Repo:
        self.require_writer(caller, repo)
        if private is not None:
            with self._db(write=True) as db:
                db.execute("UPDATE repos SET private = ? WHERE id = ?", (int(private), repo.id))
        return self.get_repo(caller, repo.type, repo.repo_id)

    def move_repo(self, caller: Caller | None, repo: Repo, to_id: str) -> Repo:
        """Rename `repo` (into another namespace too, where the caller may write); its commits keep their ids."""
        caller = self.require_writer(caller, repo)
        namespace, _, name = to_id.partition("/")
        check_repo_name(namespace, name)
        if not caller.writes(namespace):
            raise Forbidden(f"{caller.user} may not move a repo into {namespace}: you need write access there")
        with self._db(write=True) as db:
            if _kind(db, namespace) is None:
                raise BadRequest(f"there is no user or organisation {namespace!r} in this registry")
            try:
                db.execute("UPDATE repos SET namespace = ?, name = ? WHERE id = ?", (namespace, name, repo.id))
            except sqlite3.IntegrityError:
                raise Conflict(f"{repo.type} repo {to_id} already exists") from None
        return self.get_repo(caller, repo.type, to_id)

    # --- revisions ----------------------------------------------------------------------------

    def resolve(self, repo: Repo, revision: str) -> Commit:
        """A branch, a tag (also as `refs/heads/X`, `refs/tags/X`) or a full 40-hex commit id of this repo."""
        kinds, name = ("branch", "tag"), revision
        if revision.startswith("refs/heads/"):
            kinds, name = ("branch",), revision.removeprefix("refs/heads/")
        elif revision.startswith("refs/tags/"):
            kinds, name = ("tag",), revision.removeprefix("refs/tags/")
        with self._db() as db:
            row = db.execute(f"SELECT c.* FROM refs r JOIN commits c ON c.oid = r.commit_oid WHERE r.repo_id = ? "
                             f"AND r.name = ? AND r.kind IN ({', '.join('?' * len(kinds))}) ORDER BY r.kind = 'branch' DESC",
                             (repo.id, name, *kinds)).fetchone()
            if row is None and SHA1_HEX.match(revision):
                row = db.execute("SELECT * FROM commits WHERE oid = ? AND repo_id = ?", (revision, repo.id)).fetchone()
        if row is None:
            if revision.startswith("refs/pr/"):
                raise RevisionNotFound(f"Invalid rev id: {revision}: pull requests are not supported by this registry")
            hint = " (a commit id must be the full 40 hex characters)" if re.fullmatch(r"[0-9a-f]{4,39}", revision) else ""
            raise RevisionNotFound(f"Invalid rev id: {revision}: no branch, tag or commit of {repo.repo_id}{hint}")
        return _commit(row)

    def tree(self, commit: Commit) -> list[FileEntry]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM tree_entries WHERE commit_oid = ? ORDER BY path", (commit.oid,)).fetchall()
        return [_entry(row) for row in rows]

    def file(self, commit: Commit, path: str) -> FileEntry:
        with self._db() as db:
            row = db.execute("SELECT * FROM tree_entries WHERE commit_oid = ? AND path = ?", (commit.oid, path)).fetchone()
        if row is None:
            raise EntryNotFound(f"{path} does not exist at revision {commit.oid}")
        return _entry(row)

    def refs(self, repo: Repo) -> dict[str, list[tuple[str, str, str | None]]]:
        """{"branch": [(name, commit, None)], "tag": [(name, commit, message)]}"""
        with self._db() as db:
            rows = db.execute("SELECT kind, name, commit_oid, message FROM refs WHERE repo_id = ? ORDER BY name",
                              (repo.id,)).fetchall()
        return {kind: [(r["name"], r["commit_oid"], r["message"]) for r in rows if r["kind"] == kind]
                for kind in ("branch", "tag")}

    def history(self, commit: Commit) -> list[Commit]:
        """The commit and its ancestors, newest first."""
        out, oid = [], commit.oid
        with self._db() as db:
            while oid:
                row = db.execute("SELECT * FROM commits WHERE oid = ?", (oid,)).fetchone()
                out.append(_commit(row))
                oid = row["parent"]
        return out

    def create_ref(self, caller: Caller | None, repo: Repo, kind: str, name: str, revision: str | None,
                   message: str | None = None) -> Commit:
        """A new branch or tag at `revision` (a branch starts at the head of main without one); a
        tag may carry a message (huggingface_hub's `create_tag(tag_message=...)`).

        Raises:
            Conflict: a branch or a tag of that name exists (one name, one meaning).
        """
        self.require_writer(caller, repo)
        check_ref_name(name, kind)
        commit = self.resolve(repo, revision or "main")
        with self._db(write=True) as db:
            taken = db.execute("SELECT kind FROM refs WHERE repo_id = ? AND name = ?", (repo.id, name)).fetchone()
            if taken is not None:
                raise Conflict(f"{repo.repo_id} already has a {taken['kind']} named {name}"
                               + ("" if taken["kind"] == kind else "; a branch and a tag may not share a name"))
            db.execute("INSERT INTO refs (repo_id, kind, name, commit_oid, message) VALUES (?, ?, ?, ?, ?)",
                       (repo.id, kind, name, commit.oid, message))
        self._moved(repo, "create", _ref(kind, name), None, commit.oid)
        return commit

    def delete_ref(self, caller: Caller | None, repo: Repo, kind: str, name: str) -> None:
        self.require_writer(caller, repo)
        if kind == "branch" and name == "main":
            raise BadRequest(f"main is the default branch of {repo.repo_id} and cannot be deleted")
        with self._db(write=True) as db:
            old = db.execute("SELECT commit_oid FROM refs WHERE repo_id = ? AND kind = ? AND name = ?",
                             (repo.id, kind, name)).fetchone()
            if old is None:
                raise RevisionNotFound(f"{kind} {name} does not exist in {repo.repo_id}")
            db.execute("DELETE FROM refs WHERE repo_id = ? AND kind = ? AND name = ?", (repo.id, kind, name))
        self._moved(repo, "delete", _ref(kind, name), old[0], None)

    def card(self, commit: Commit) -> dict:
        """The YAML front matter of README.md at this commit ({} without one or when unreadable)."""
        try:
            entry = self.file(commit, "README.md")
        except EntryNotFound:
            return {}
        return self.card_of(entry)

    def card_of(self, readme: FileEntry | None) -> dict:
        """The front matter of a README entry ({} for None, or when it is unreadable), without the
        fields of a type the Hub's clients cannot parse (`hub.cards.readable`)."""
        if readme is None:
            return {}
        if readme.sha256 not in self._cards:
            try:
                card = front_matter(self.blob_path(readme).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as e:
                logging.getLogger(__name__).warning("README.md with sha256 %s is served without card data: %s",
                                                    readme.sha256, e)
                card = {}
            if problems := field_problems(card):
                logging.getLogger(__name__).warning("README.md with sha256 %s is served without the fields it "
                                                    "gives the wrong type: %s", readme.sha256, "; ".join(problems))
            self._cards[readme.sha256] = readable(card)
        return self._cards[readme.sha256]

    # --- file contents ------------------------------------------------------------------------

    def blob_path(self, entry: FileEntry) -> Path:
        """Where the content of a file of some commit lies on disk."""
        return self._blobs.path(entry.sha256)

    @property
    def max_file_size(self) -> int:
        """The largest file, in bytes, this registry takes."""
        return self._blobs.max_file_size

    def check_oid(self, sha256: str) -> None:
        """Raises BadRequest unless `sha256` is 64 lowercase hex characters."""
        self._blobs.path(sha256)

    def may_link(self, caller: Caller, sha256: str, size: int | None = None) -> bool:
        """Whether `caller` may put the stored LFS object `sha256` (of `size` bytes, when given) in a
        commit: they uploaded it themselves, or it is a file of a repo they can read. Anything else
        answers as if it were not stored, so nobody learns what others uploaded."""
        if not SHA256_HEX.match(sha256):
            return False
        if not (self._blobs.has(sha256, size) if size is not None else self._blobs.path(sha256).exists()):
            return False
        with self._db() as db:
            if db.execute("SELECT 1 FROM uploads WHERE sha256 = ? AND user = ?", (sha256, caller.user)).fetchone():
                return True
            rows = db.execute("SELECT DISTINCT r.namespace, r.private FROM tree_entries t JOIN commits c ON c.oid = "
                              "t.commit_oid JOIN repos r ON r.id = c.repo_id WHERE t.sha256 = ?", (sha256,)).fetchall()
        return any(can_read(caller, row["namespace"], bool(row["private"])) for row in rows)

    def begin_upload(self, sha256: str, size: int) -> Upload:
        """An LFS object being received; it is stored only if its sha256 and size match.

        Raises:
            TooLarge: `size` is over `max_file_size`.
        """
        return self._blobs.begin_upload(sha256, size)

    def record_upload(self, sha256: str, user: str) -> None:
        """`user` has sent the bytes of `sha256`: from now on they may link it (`may_link`)."""
        with self._db(write=True) as db:
            db.execute("INSERT OR REPLACE INTO uploads VALUES (?, ?, ?)", (sha256, user, now()))

    def upload_signature(self, sha256: str, size: int, expires: int, user: str) -> str:
        """The credential an LFS upload URL carries (the client sends no token with the PUT)."""
        return hmac.new(self.upload_secret, f"{sha256}:{size}:{expires}:{user}".encode(), "sha256").hexdigest()

    # --- commits ------------------------------------------------------------------------------

    def commit(self, caller: Caller | None, repo: Repo, branch: str, operations: list, title: str,
               message: str = "", parent: str | None = None) -> Commit:
        """Apply additions and deletions to the branch head in one atomic commit.

        Raises:
            PreconditionFailed: `parent` is given and is not the branch head.
        """
        caller = self.require_writer(caller, repo)
        if not isinstance(title, str) or not title.strip():
            raise BadRequest("the commit message (summary) is empty")
        if not isinstance(message, str):
            raise BadRequest("the commit description must be a string")
        if parent is not None and not (isinstance(parent, str) and re.fullmatch(r"[0-9a-f]{7,40}", parent)):
            raise BadRequest(f"parentCommit {parent!r} is not a commit id")
        branch = branch.removeprefix("refs/heads/")
        for op in operations:
            check_path(op.path)
        inline = [op for op in operations if isinstance(op, AddFile) and op.data is not None]
        added = {op.path: FileEntry(op.path, len(op.data), sha, git_blob_sha1(op.data), False)
                 for op, sha in zip(inline, self._blobs.put_many([op.data for op in inline]))}
        with self._db(write=True) as db:
            head = db.execute("SELECT commit_oid FROM refs WHERE repo_id = ? AND kind = 'branch' AND name = ?",
                              (repo.id, branch)).fetchone()
            if head is None:
                tag = db.execute("SELECT 1 FROM refs WHERE repo_id = ? AND kind = 'tag' AND name = ?", (repo.id, branch)).fetchone()
                if tag or SHA1_HEX.match(branch):
                    raise BadRequest(f"{branch} is a {'tag' if tag else 'commit'} of {repo.repo_id}: commits go to a branch "
                                     "(create one with `create_branch`)")
                raise RevisionNotFound(f"Invalid rev id: {branch}: {repo.repo_id} has no branch {branch} "
                                       "(create it with `create_branch`)")
            head = head[0]
            if parent is not None and not head.startswith(parent):
                raise PreconditionFailed(f"A commit has happened since {parent[:12]}: the head of {branch} is now "
                                         f"{head[:12]}. Pull, then push again.")
            for op in operations:  # checked under the write lock that `hub gc` deletes under
                if isinstance(op, AddFile) and op.data is None:
                    added[op.path] = self._linked_entry(caller, op)
            lost = [op.data for op in inline if not self._blobs.path(added[op.path].sha256).exists()]
            self._blobs.put_many(lost)  # collected between put_many and the lock (a --grace shorter than the commit)
            rows = db.execute("SELECT * FROM tree_entries WHERE commit_oid = ?", (head,)).fetchall()
            tree = {row["path"]: _entry(row) for row in rows}
            _delete_paths(tree, [op for op in operations if isinstance(op, DeletePath)])
            tree.update(added)
            oid = self._insert_commit(db, repo.id, head, list(tree.values()), caller.user, title, message)
            db.execute("UPDATE refs SET commit_oid = ? WHERE repo_id = ? AND kind = 'branch' AND name = ?",
                       (oid, repo.id, branch))
        self._moved(repo, "update", _ref("branch", branch), head, oid)
        return self.resolve(repo, oid)

    def squash(self, caller: Caller | None, repo: Repo, branch: str, message: str) -> Commit:
        """Replace the history of `branch` by one commit of its current tree (`super_squash_history`).
        The old commits stay resolvable by id for what pinned them."""
        caller = self.require_writer(caller, repo)
        head = self.resolve(repo, f"refs/heads/{branch}")
        with self._db(write=True) as db:
            oid = self._insert_commit(db, repo.id, None, self.tree(head), caller.user, message or "Squash", "")
            if db.execute("UPDATE refs SET commit_oid = ? WHERE repo_id = ? AND kind = 'branch' AND name = ? AND "
                          "commit_oid = ?", (oid, repo.id, branch, head.oid)).rowcount == 0:
                raise PreconditionFailed(f"{branch} of {repo.repo_id} moved while squashing; try again")
        self._moved(repo, "update", _ref("branch", branch), head.oid, oid)
        return self.resolve(repo, oid)

    def _linked_entry(self, caller: Caller, op: AddFile) -> FileEntry:
        """The entry of an `lfsFile` line: an object the caller may link (`may_link`)."""
        if op.sha256 is None or not self.may_link(caller, op.sha256, op.size):
            raise BadRequest(f"the LFS object for {op.path} (sha256 {op.sha256}) was not uploaded")
        size = op.size if op.size is not None else self._blobs.path(op.sha256).stat().st_size
        return FileEntry(op.path, size, op.sha256, git_blob_sha1(lfs_pointer(op.sha256, size)), True)

    def _insert_commit(self, db, repo_id: int, parent: str | None, entries: list[FileEntry], author: str,
                       title: str, message: str) -> str:
        date = now()
        oid = commit_oid(parent, [(e.path, e.git_oid) for e in entries], author, date, title, message, repo_id)
        db.execute("INSERT INTO commits VALUES (?, ?, ?, ?, ?, ?, ?)", (oid, repo_id, parent, title, message, author, date))
        db.executemany("INSERT INTO tree_entries VALUES (?, ?, ?, ?, ?, ?)",
                       [(oid, e.path, e.sha256, e.size, e.git_oid, int(e.lfs)) for e in entries])
        return oid


def _migrate(db) -> None:
    """Bring a registry made by an earlier loradock up to this schema, in the open transaction:
    repos get a type (all were models); the users its tokens name become users; a namespace of
    repos that no token's user owns becomes an organisation with every one of those users a
    `write` member, as every write token could write there before (a token's read-only role stays)."""
    fresh = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'namespaces'").fetchone() is None
    had_repos = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'repos'").fetchone() is not None
    if had_repos and "type" not in {row["name"] for row in db.execute("PRAGMA table_info(repos)")}:
        db.execute("ALTER TABLE repos RENAME TO repos_untyped")
        db.execute(SCHEMA.split(";")[0].strip())
        db.execute("INSERT INTO repos (id, type, namespace, name, private, created_at) "
                   "SELECT id, 'model', namespace, name, private, created_at FROM repos_untyped")
        db.execute("DROP TABLE repos_untyped")
    had_refs = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'refs'").fetchone() is not None
    if had_refs and "message" not in {row["name"] for row in db.execute("PRAGMA table_info(refs)")}:
        db.execute("ALTER TABLE refs ADD COLUMN message TEXT")
    for statement in SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    if fresh:
        db.execute(NAMESPACES)
        db.execute("INSERT OR IGNORE INTO namespaces SELECT DISTINCT user, 'user', ? FROM tokens", (now(),))
        orgs = [row[0] for row in db.execute("SELECT DISTINCT namespace FROM repos WHERE namespace NOT IN "
                                             "(SELECT name FROM namespaces)")]
        db.executemany("INSERT INTO namespaces VALUES (?, 'org', ?)", [(org, now()) for org in orgs])
        db.executemany("INSERT INTO members SELECT ?, name, 'write' FROM namespaces WHERE kind = 'user'",
                       [(org,) for org in orgs])


def _kind(db, name: str) -> str | None:
    row = db.execute("SELECT kind FROM namespaces WHERE name = ?", (name,)).fetchone()
    return row["kind"] if row else None


def _delete_paths(tree: dict[str, FileEntry], deletions: list[DeletePath]) -> None:
    """Take the files and folders named out of `tree` (path -> entry), in place.

    Raises:
        EntryNotFound: a deletion names nothing in the tree.
    """
    for op in deletions:
        prefix = op.path.rstrip("/") + "/"
        gone = [p for p in tree if p.startswith(prefix)] if op.folder else [op.path] if op.path in tree else []
        if not gone:
            raise EntryNotFound(f"A file with this name doesn't exist: {op.path}")
        for p in gone:
            del tree[p]


def _ref(kind: str, name: str) -> str:
    return f"refs/{'heads' if kind == 'branch' else 'tags'}/{name}"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def _repo(row) -> Repo:
    return Repo(row["id"], row["type"], row["namespace"], row["name"], bool(row["private"]), row["created_at"])


def _commit(row, prefix: str = "") -> Commit:
    return Commit(*(row[prefix + key] for key in ("oid", "parent", "title", "message", "author", "created_at")))


def _entry(row, prefix: str = "") -> FileEntry:
    return FileEntry(row[prefix + "path"], row[prefix + "size"], row[prefix + "sha256"], row[prefix + "git_oid"],
                     bool(row[prefix + "lfs"]))
