"""The registry's storage: repos, commits, trees, refs and tokens in SQLite; file contents in the
content-addressed blob store of `hub.blobs`.

No web imports: the routes of `hub.routes` call these methods (never the blob store itself), and
`hub.server` maps the errors of `hub.errors` to HTTP.

Atomicity: a commit first puts every new blob in place (each written to `tmp/` and renamed), then
records the commit, its tree and the branch move in one SQLite transaction that also checks the
branch head has not moved. A process killed before that transaction commits leaves the repo at
its previous commit; blobs nobody references are invisible, and `tmp/` is emptied at start-up.
"""

import contextlib
import hashlib
import hmac
import re
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from hub.errors import (BadRequest, Conflict, EntryNotFound, Forbidden, PreconditionFailed, RepoNotFound,
                        RevisionNotFound, Unauthorized)
from hub.blobs import BlobStore, Upload
from hub.cards import front_matter
from hub.objects import SHA1_HEX, commit_oid, git_blob_sha1, lfs_pointer

SCHEMA = """
CREATE TABLE IF NOT EXISTS repos (
    id INTEGER PRIMARY KEY, namespace TEXT NOT NULL, name TEXT NOT NULL, private INTEGER NOT NULL,
    created_at TEXT NOT NULL, UNIQUE (namespace, name));
CREATE TABLE IF NOT EXISTS commits (
    oid TEXT PRIMARY KEY, repo_id INTEGER NOT NULL, parent TEXT, title TEXT NOT NULL, message TEXT NOT NULL,
    author TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tree_entries (
    commit_oid TEXT NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    git_oid TEXT NOT NULL, lfs INTEGER NOT NULL, PRIMARY KEY (commit_oid, path));
CREATE TABLE IF NOT EXISTS refs (
    repo_id INTEGER NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, commit_oid TEXT NOT NULL,
    PRIMARY KEY (repo_id, kind, name));
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY, name TEXT NOT NULL, user TEXT NOT NULL, role TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

NAME = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}$")
REF_NAME = re.compile(r"^[\w.\-/]{1,200}$")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def now() -> str:
    """UTC with a trailing Z and milliseconds: the only date form the client parses."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Caller:
    user: str
    role: str  # "read" or "write"


@dataclass(frozen=True)
class Repo:
    id: int
    namespace: str
    name: str
    private: bool
    created_at: str

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"


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
    sha256: str | None = None  # an uploaded LFS object
    size: int | None = None


@dataclass(frozen=True)
class DeletePath:
    path: str
    folder: bool = False


def check_path(path: str) -> str:
    """A repo file path that cannot escape anything: relative, no `..`, no backslash, no control chars."""
    if (not path or len(path) > 1000 or path.startswith("/") or "\\" in path or any(ord(c) < 32 for c in path)
            or any(part in ("", ".", "..") for part in path.rstrip("/").split("/")) or path.startswith(".git/")):
        raise BadRequest(f"invalid file path {path!r}: use a relative path without '..' segments")
    return path


def check_repo_name(namespace: str, name: str) -> None:
    for part in (namespace, name):
        if not NAME.match(part or "") or "--" in part or ".." in part or part.endswith(".git"):
            raise BadRequest(f"invalid repo id {namespace}/{name!s}: use namespace/name with letters, digits, '-', '_', '.'")


class Registry:
    def __init__(self, root: Path, max_file_size: int = 5 * 2**30):
        self.root = Path(root)
        self._blobs = BlobStore(self.root, max_file_size)
        self.db_path = self.root / "registry.sqlite"
        self._cards: dict[str, dict] = {}  # README sha256 -> front matter
        self._local = threading.local()  # one SQLite connection per thread
        with self._db() as db:
            db.executescript(SCHEMA)
            db.execute("INSERT OR IGNORE INTO settings VALUES ('upload_secret', ?)", (secrets.token_hex(32),))
            self.upload_secret = db.execute("SELECT value FROM settings WHERE key='upload_secret'").fetchone()[0].encode()

    @contextlib.contextmanager
    def _db(self, write: bool = False):
        """This thread's connection; with `write`, inside one `BEGIN IMMEDIATE` transaction."""
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

    # --- tokens -------------------------------------------------------------------------------

    def create_token(self, name: str, user: str, role: str = "write") -> str:
        if role not in ("read", "write"):
            raise BadRequest(f"token role {role!r} must be read or write")
        if not NAME.match(user):
            raise BadRequest(f"invalid user name {user!r}")
        token = "hf_" + secrets.token_urlsafe(30)
        with self._db(write=True) as db:
            db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?)", (_hash(token), name, user, role, now()))
        return token

    def authenticate(self, token: str | None) -> Caller | None:
        """The caller a token stands for; None without a token. An unknown token is an error, not anonymity."""
        if not token:
            return None
        with self._db() as db:
            row = db.execute("SELECT user, role FROM tokens WHERE hash = ?", (_hash(token),)).fetchone()
        if row is None:
            raise Unauthorized("Invalid credentials in Authorization header")
        return Caller(row["user"], row["role"])

    @staticmethod
    def require_write(caller: Caller | None) -> Caller:
        if caller is None:
            raise Unauthorized("a write token is needed: create one with `loradock hub token create`")
        if caller.role != "write":
            raise Forbidden(f"the token of {caller.user} is read-only; use a write token")
        return caller

    # --- repos --------------------------------------------------------------------------------

    def create_repo(self, caller: Caller | None, namespace: str, name: str, private: bool) -> Repo:
        caller = self.require_write(caller)
        check_repo_name(namespace, name)
        with self._db(write=True) as db:
            try:
                cur = db.execute("INSERT INTO repos (namespace, name, private, created_at) VALUES (?, ?, ?, ?)",
                                 (namespace, name, int(private), now()))
            except sqlite3.IntegrityError:
                raise Conflict(f"repo {namespace}/{name} already exists") from None
            repo_id, sha = cur.lastrowid, self._blobs.put(GITATTRIBUTES)
            entry = FileEntry(".gitattributes", len(GITATTRIBUTES), sha, git_blob_sha1(GITATTRIBUTES), False)
            self._insert_commit(db, repo_id, None, [entry], caller.user, "initial commit", "")
            db.execute("INSERT INTO refs VALUES (?, 'branch', 'main', (SELECT oid FROM commits WHERE repo_id = ?))",
                       (repo_id, repo_id))
        return self.get_repo(caller, f"{namespace}/{name}")

    def delete_repo(self, caller: Caller | None, repo_id: str) -> None:
        repo = self.get_repo(self.require_write(caller), repo_id)
        with self._db(write=True) as db:
            db.execute("DELETE FROM tree_entries WHERE commit_oid IN (SELECT oid FROM commits WHERE repo_id = ?)", (repo.id,))
            for table in ("commits", "refs"):
                db.execute(f"DELETE FROM {table} WHERE repo_id = ?", (repo.id,))
            db.execute("DELETE FROM repos WHERE id = ?", (repo.id,))

    def get_repo(self, caller: Caller | None, repo_id: str) -> Repo:
        """The repo, if it exists and the caller may see it (private repos need a token)."""
        namespace, _, name = repo_id.partition("/")
        with self._db() as db:
            row = db.execute("SELECT * FROM repos WHERE namespace = ? AND name = ?", (namespace, name)).fetchone()
        if row is None or (row["private"] and caller is None):
            raise RepoNotFound(f"Repository Not Found for url: {repo_id}")
        return _repo(row)

    def list_repos(self, caller: Caller | None) -> list[Repo]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM repos ORDER BY namespace, name").fetchall()
        return [_repo(row) for row in rows if caller is not None or not row["private"]]

    # --- revisions ----------------------------------------------------------------------------

    def resolve(self, repo: Repo, revision: str) -> Commit:
        """A branch, a tag or a full 40-hex commit id of this repo."""
        with self._db() as db:
            row = db.execute("SELECT c.* FROM refs r JOIN commits c ON c.oid = r.commit_oid WHERE r.repo_id = ? "
                             "AND r.name = ? ORDER BY r.kind = 'branch' DESC", (repo.id, revision)).fetchone()
            if row is None and SHA1_HEX.match(revision):
                row = db.execute("SELECT * FROM commits WHERE oid = ? AND repo_id = ?", (revision, repo.id)).fetchone()
        if row is None:
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

    def refs(self, repo: Repo) -> dict[str, list[tuple[str, str]]]:
        with self._db() as db:
            rows = db.execute("SELECT kind, name, commit_oid FROM refs WHERE repo_id = ? ORDER BY name", (repo.id,)).fetchall()
        return {kind: [(r["name"], r["commit_oid"]) for r in rows if r["kind"] == kind] for kind in ("branch", "tag")}

    def history(self, commit: Commit) -> list[Commit]:
        """The commit and its ancestors, newest first."""
        out, oid = [], commit.oid
        with self._db() as db:
            while oid:
                row = db.execute("SELECT * FROM commits WHERE oid = ?", (oid,)).fetchone()
                out.append(_commit(row))
                oid = row["parent"]
        return out

    def create_tag(self, caller: Caller | None, repo: Repo, tag: str, revision: str) -> None:
        self.require_write(caller)
        if not REF_NAME.match(tag) or ".." in tag or SHA1_HEX.match(tag):
            raise BadRequest(f"invalid tag name {tag!r}")
        commit = self.resolve(repo, revision)
        with self._db(write=True) as db:
            try:
                db.execute("INSERT INTO refs VALUES (?, 'tag', ?, ?)", (repo.id, tag, commit.oid))
            except sqlite3.IntegrityError:
                raise Conflict(f"tag {tag} already exists in {repo.repo_id}") from None

    def delete_tag(self, caller: Caller | None, repo: Repo, tag: str) -> None:
        self.require_write(caller)
        with self._db(write=True) as db:
            if db.execute("DELETE FROM refs WHERE repo_id = ? AND kind = 'tag' AND name = ?", (repo.id, tag)).rowcount == 0:
                raise RevisionNotFound(f"tag {tag} does not exist in {repo.repo_id}")

    def card(self, commit: Commit) -> dict:
        """The YAML front matter of README.md at this commit ({} without one or when unreadable)."""
        try:
            entry = self.file(commit, "README.md")
        except EntryNotFound:
            return {}
        if entry.sha256 not in self._cards:
            try:
                self._cards[entry.sha256] = front_matter(self.blob_path(entry).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError):
                self._cards[entry.sha256] = {}
        return self._cards[entry.sha256]

    # --- file contents ------------------------------------------------------------------------

    def blob_path(self, entry: FileEntry) -> Path:
        """Where the content of a file of some commit lies on disk."""
        return self._blobs.path(entry.sha256)

    @property
    def max_file_size(self) -> int:
        """The largest file, in bytes, this registry takes."""
        return self._blobs.max_file_size

    def has_lfs_object(self, sha256: str, size: int) -> bool:
        """Whether an LFS object of this sha256 and size is stored.

        Raises:
            BadRequest: `sha256` is not 64 hex characters.
        """
        return self._blobs.has(sha256, size)

    def begin_upload(self, sha256: str, size: int) -> Upload:
        """An LFS object being received; it is stored only if its sha256 and size match.

        Raises:
            TooLarge: `size` is over `max_file_size`.
        """
        return self._blobs.begin_upload(sha256, size)

    def upload_signature(self, sha256: str, size: int, expires: int) -> str:
        """The credential an LFS upload URL carries (the client sends no token with the PUT)."""
        return hmac.new(self.upload_secret, f"{sha256}:{size}:{expires}".encode(), "sha256").hexdigest()

    # --- commits ------------------------------------------------------------------------------

    def commit(self, caller: Caller | None, repo: Repo, branch: str, operations: list, title: str,
               message: str = "", parent: str | None = None) -> Commit:
        """Apply additions and deletions to the branch head in one atomic commit.

        Raises:
            PreconditionFailed: `parent` is given and is not the branch head.
        """
        caller = self.require_write(caller)
        if not title.strip():
            raise BadRequest("the commit message (summary) is empty")
        if parent is not None and not re.fullmatch(r"[0-9a-f]{7,40}", parent):
            raise BadRequest(f"parentCommit {parent!r} is not a commit id")
        added: dict[str, FileEntry] = {}
        for op in operations:
            if isinstance(op, AddFile):
                added[op.path] = self._entry_for(op)
            else:
                check_path(op.path)
        with self._db(write=True) as db:
            head = db.execute("SELECT commit_oid FROM refs WHERE repo_id = ? AND kind = 'branch' AND name = ?",
                              (repo.id, branch)).fetchone()
            if head is None:
                raise RevisionNotFound(f"Invalid rev id: {branch}: {repo.repo_id} has no branch {branch}")
            head = head[0]
            if parent is not None and not head.startswith(parent):
                raise PreconditionFailed(f"A commit has happened since {parent[:12]}: the head of {branch} is now "
                                         f"{head[:12]}. Pull, then push again.")
            rows = db.execute("SELECT * FROM tree_entries WHERE commit_oid = ?", (head,)).fetchall()
            tree = {row["path"]: _entry(row) for row in rows}
            _delete_paths(tree, [op for op in operations if isinstance(op, DeletePath)])
            tree.update(added)
            oid = self._insert_commit(db, repo.id, head, list(tree.values()), caller.user, title, message)
            db.execute("UPDATE refs SET commit_oid = ? WHERE repo_id = ? AND kind = 'branch' AND name = ?",
                       (oid, repo.id, branch))
        return self.resolve(repo, oid)

    def _entry_for(self, op: AddFile) -> FileEntry:
        check_path(op.path)
        if op.data is not None:
            return FileEntry(op.path, len(op.data), self._blobs.put(op.data), git_blob_sha1(op.data), False)
        if op.sha256 is None or op.size is None or not self.has_lfs_object(op.sha256, op.size):
            raise BadRequest(f"the LFS object for {op.path} (sha256 {op.sha256}) was not uploaded")
        return FileEntry(op.path, op.size, op.sha256, git_blob_sha1(lfs_pointer(op.sha256, op.size)), True)

    def _insert_commit(self, db, repo_id: int, parent: str | None, entries: list[FileEntry], author: str,
                       title: str, message: str) -> str:
        date = now()
        oid = commit_oid(parent, [(e.path, e.git_oid) for e in entries], author, date, title, message)
        db.execute("INSERT INTO commits VALUES (?, ?, ?, ?, ?, ?, ?)", (oid, repo_id, parent, title, message, author, date))
        db.executemany("INSERT INTO tree_entries VALUES (?, ?, ?, ?, ?, ?)",
                       [(oid, e.path, e.sha256, e.size, e.git_oid, int(e.lfs)) for e in entries])
        return oid


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


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _repo(row) -> Repo:
    return Repo(row["id"], row["namespace"], row["name"], bool(row["private"]), row["created_at"])


def _commit(row) -> Commit:
    return Commit(row["oid"], row["parent"], row["title"], row["message"], row["author"], row["created_at"])


def _entry(row) -> FileEntry:
    return FileEntry(row["path"], row["size"], row["sha256"], row["git_oid"], bool(row["lfs"]))
