"""Verified downloads for `loradock pull`: each file streamed once, hashed as it is written; the
registry's listing refused before any byte is fetched where it could write outside the pull folder;
the finished folder moved into place in one rename.

huggingface_hub resolves the revision and lists the files with their hashes; the bytes are read
here, by hand, for two reasons no library covers: huggingface_hub checks a download's size but
never its sha256, and its httpx2 stream tops out near 500 MB/s on a 2-core machine where a plain
socket read gets 1-3 GB/s from the same server (bench/hub_bench.py). Each file is one GET on the
Hub's `/resolve/{commit}/{path}` URL; a redirect to another origin (huggingface.co's CDN) is
followed without the token, as huggingface_hub does. The socket read and the hashing + writing
run in two threads, so verification costs no extra pass over the data.
"""

import contextlib
import hashlib
import json
import os
import queue
import threading
import urllib.parse
import urllib.request
from pathlib import Path

from hub.adapter import PULL_MARKER
from hub.objects import SHA1_HEX, is_repo_path
from hub.timeouts import READ_S
from loradock.errors import LoradockError

CHUNK = 8 << 20
_DONE = object()  # end of the stream


def git_blob_hasher(size: int):
    digest = hashlib.sha1()
    digest.update(b"blob %d\0" % size)
    return digest


class _DropTokenOffOrigin(urllib.request.HTTPRedirectHandler):
    """Follow redirects, sending the token only to the origin it was meant for."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl)[:2] != urllib.parse.urlsplit(req.full_url)[:2]:
            new.remove_header("Authorization")
        return new


_opener = urllib.request.build_opener(_DropTokenOffOrigin)


def path_in(folder: Path, name: str) -> Path | None:
    """Where repo file `name` goes under `folder`; None when it is not a repo path or, joined and
    resolved (links included), it is not inside `folder`."""
    if not is_repo_path(name):
        return None
    target = folder / name
    root = folder.resolve()
    resolved = target.resolve()
    return target if resolved != root and resolved.is_relative_to(root) else None


def fetch(url: str, headers: dict, target: Path, digest, size: int) -> str:
    """Stream `url` into `target`, feeding `digest`; returns its hex digest. Never writes more than
    the `size` bytes announced: a server that sends more is cut off at the first byte past it.

    Raises:
        OSError: a short read, more bytes than `size`, or a transport error (TimeoutError: the
            server sent nothing for `hub.timeouts.READ_S` seconds).
    """
    chunks: queue.Queue = queue.Queue(maxsize=4)
    failure: list[BaseException] = []

    def read() -> None:
        try:
            request = urllib.request.Request(url, headers=headers)
            with _opener.open(request, timeout=READ_S) as response:  # the connect, then each silence of the stream
                left = size
                # Asking for one byte past what is left is how an overlong body shows itself.
                while chunk := response.read(min(CHUNK, left + 1)):
                    if len(chunk) > left:
                        raise OSError(f"{target.name}: received more than the {size} bytes announced")
                    left -= len(chunk)
                    chunks.put(chunk)
        except BaseException as e:  # handed to the writing thread, raised there
            failure.append(e)
        finally:
            chunks.put(_DONE)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    written = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as f:
        while (chunk := chunks.get()) is not _DONE:
            digest.update(chunk)
            f.write(chunk)
            written += len(chunk)
    reader.join()
    if failure:
        raise failure[0]
    if written != size:
        raise OSError(f"{target.name}: received {written} of {size} bytes")
    return digest.hexdigest()


def download_file(endpoint: str, token: str | None, repo_id: str, commit: str, sibling, target: Path) -> tuple[str, str]:
    """Download one file of a commit (a `RepoSibling` of `model_info(files_metadata=True)`); returns
    (actual hash, expected hash) for the caller to compare."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(repo_id, sibling.rfilename, revision=commit, endpoint=endpoint)
    headers = {"Authorization" if k == "authorization" else k: v
               for k, v in build_hf_headers(token=token or False, library_name="loradock").items()}
    if sibling.lfs is not None:
        digest, expected = hashlib.sha256(), sibling.lfs.sha256
    else:
        digest, expected = git_blob_hasher(sibling.size), sibling.blob_id
    return fetch(url, headers, target, digest, sibling.size), expected


# --- what a pull refuses, and how its folder lands -----------------------------------------------

DISTRUST_FIX = ("check that --registry / LORADOCK_REGISTRY is the registry you mean, reached over https; "
                 "if it is, its answer is damaged: tell its operator")


def checked_listing(info, endpoint: str, spec: str) -> tuple[str, list]:
    """The commit and the files of a `model_info(files_metadata=True)` answer, refused before any
    byte is downloaded where they could write outside the pull folder. The endpoint chooses every
    name here (the commit is a folder name too): a compromised registry, or a man in the middle on
    plain http, would choose `../../.bashrc`.

    Raises:
        LoradockError: naming the commit or the file, and what is wrong with it.
    """
    sha, files = info.sha, info.siblings
    if not isinstance(sha, str) or not SHA1_HEX.match(sha):
        raise LoradockError(f"the registry at {endpoint} answered that {spec} is commit {sha!r}, "
                            "not a 40-character commit sha; nothing was kept", DISTRUST_FIX)
    if files is None:
        raise LoradockError(f"the registry at {endpoint} did not list the files of {spec}; nothing was kept",
                            DISTRUST_FIX)
    seen = set()
    for f in files:
        if f.rfilename == PULL_MARKER:
            raise LoradockError(f"the registry at {endpoint} answered a file name that would overwrite the pull "
                                f"marker for {spec}: {f.rfilename!r}; nothing was kept", DISTRUST_FIX)
        if not is_repo_path(f.rfilename):
            raise outside_the_repo(endpoint, spec, f.rfilename)
        if f.rfilename in seen:
            raise LoradockError(f"the registry at {endpoint} listed {f.rfilename!r} twice for {spec}; nothing was kept",
                                DISTRUST_FIX)
        if not isinstance(f.size, int) or f.size < 0:
            raise LoradockError(f"the registry at {endpoint} did not say how large {f.rfilename!r} is in {spec} "
                                f"(size {f.size!r}); nothing was kept", DISTRUST_FIX)
        seen.add(f.rfilename)
    return sha, files


def outside_the_repo(endpoint: str, spec: str, name: str) -> LoradockError:
    return LoradockError(f"the registry at {endpoint} answered a file name outside the repo: {name!r} "
                         f"(in {spec}); nothing was kept", DISTRUST_FIX)


def staged_path(staging: Path, name: str, endpoint: str, spec: str) -> Path:
    """`name` joined to the staging folder, resolved, and refused unless it is inside it (a second
    guard behind `checked_listing`)."""
    target = path_in(staging, name)
    if target is None:
        raise outside_the_repo(endpoint, spec, name)
    return target


def move_into_place(staging: Path, dest: Path, sha: str) -> None:
    """Rename the finished `staging` folder to `dest`. Another pull of the same commit can get
    there first (`loradock serve` pulls `x@main` and `x@v1` at once when both are one commit, and
    both go to `pulled/x/SHA`): its folder, complete and verified, is as good as ours, which the
    caller then discards. Anything else already at `dest` is an error.

    Raises:
        OSError: `dest` holds something other than this commit.
    """
    try:
        with contextlib.suppress(FileNotFoundError):  # an empty --to folder; gone if another pull raced us to it
            dest.rmdir()
        os.replace(staging, dest)
    except OSError:
        if pulled_sha(dest) != sha:
            raise


def pulled_sha(dest: Path) -> str | None:
    try:
        return json.loads((dest / PULL_MARKER).read_text())["commit"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
