"""What the Hub protocol names things by: repo file paths, git blob sha1s for regular files,
sha256 for LFS files, LFS pointer files, and our commit ids. Written by hand because git's object formats are a few
lines and no library the client uses exposes them."""

import hashlib
import re

SHA1_HEX = re.compile(r"^[0-9a-f]{40}\Z")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}\Z")
REF_NAME = re.compile(r"^[\w.\-/]{1,200}\Z")


def ref_name_problem(name: str, kind: str) -> str | None:
    """Why `name` cannot be a branch or tag (`kind`) name, or None: a name must resolve to itself
    only, so not a commit id, no `..`, no `refs/` prefix."""
    if (not isinstance(name, str) or not REF_NAME.match(name) or not name.isascii() or ".." in name
            or name.startswith(("/", ".", "-", "refs/")) or name.endswith(("/", ".lock")) or "//" in name
            or SHA1_HEX.match(name)):
        return (f"invalid {kind} name {name!r}: use letters, digits, '-', '_', '.' and '/', "
                "not a 40-hex commit id, no '..', no leading 'refs/'")
    return None


def is_repo_path(path: str, folder: bool = False) -> bool:
    """Whether `path` is a file path a repo can hold (with `folder`, a trailing `/` is allowed):
    relative, no empty, `.` or `..` segment, no backslash, no control or unprintable character,
    nothing under `.git/`, at most 1000 characters. The registry refuses any other path it is
    sent, and a pull refuses any other name an endpoint answers: it could land outside the folder."""
    if not isinstance(path, str) or not 0 < len(path) <= 1000 or path.startswith(("/", ".git/")):
        return False
    parts = (path.removesuffix("/") if folder else path).split("/")
    return "\\" not in path and path.isprintable() and not any(part in ("", ".", "..") for part in parts)


def git_blob_sha1(data: bytes) -> str:
    """What `git hash-object` prints for a file with these bytes (the Hub's `oid` of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The Git LFS pointer file that stands in a repo for a large file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def commit_oid(parent: str | None, entries: list[tuple[str, str]], author: str, date: str, title: str,
               message: str, repo: int) -> str:
    """A 40-hex id over everything a commit is: its repo, its parent, its full tree (path, file
    oid), who, when and why. Stored once, so it never changes; the repo is in it so that two repos
    created by one user in the same millisecond get two initial commits."""
    tree = hashlib.sha1("".join(f"{path}\0{oid}\n" for path, oid in sorted(entries)).encode()).hexdigest()
    text = f"repo {repo}\ntree {tree}\nparent {parent or ''}\nauthor {author} {date}\n\n{title}\n\n{message}"
    return hashlib.sha1(text.encode()).hexdigest()
