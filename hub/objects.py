"""Content hashes the Hub protocol speaks: git blob sha1s for regular files, sha256 for LFS files,
LFS pointer files, and our commit ids. Written by hand because git's object formats are a few
lines and no library the client uses exposes them."""

import hashlib
import re

SHA1_HEX = re.compile(r"^[0-9a-f]{40}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def git_blob_sha1(data: bytes) -> str:
    """What `git hash-object` prints for a file with these bytes (the Hub's `oid` of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The Git LFS pointer file that stands in a repo for a large file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def commit_oid(parent: str | None, entries: list[tuple[str, str]], author: str, date: str, title: str,
               message: str) -> str:
    """A 40-hex id over everything a commit is: its parent, its full tree (path, file oid), who,
    when and why. Stored once, so it never changes; two commits never share one in practice."""
    tree = hashlib.sha1("".join(f"{path}\0{oid}\n" for path, oid in sorted(entries)).encode()).hexdigest()
    text = f"tree {tree}\nparent {parent or ''}\nauthor {author} {date}\n\n{title}\n\n{message}"
    return hashlib.sha1(text.encode()).hexdigest()
