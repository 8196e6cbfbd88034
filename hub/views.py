"""The JSON shapes of the Hub API, built from storage records (see huggingface_hub's ModelInfo,
RepoFile, RepoFolder, GitRefs and GitCommitInfo for what the client parses)."""

import hashlib
import posixpath

from hub.objects import lfs_pointer
from hub.accounts import Caller
from hub.storage import Commit, FileEntry, Repo
from hub.webhooks import Attempt, Webhook


def whoami(caller: Caller) -> dict:
    orgs = [{"type": "org", "name": org, "fullname": org, "roleInOrg": role} for org, role in sorted(caller.orgs.items())]
    return {"type": "user", "name": caller.user, "fullname": caller.user, "orgs": orgs, "isAdmin": caller.admin,
            "auth": {"type": "access_token", "accessToken": {"displayName": caller.user, "role": caller.role}}}


def sibling(entry: FileEntry, blobs: bool) -> dict:
    out = {"rfilename": entry.path}
    if blobs:
        out.update(size=entry.size, blobId=entry.git_oid)
        if entry.lfs:
            out["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": len(lfs_pointer(entry.sha256, entry.size))}
    return out


def model_info(repo: Repo, commit: Commit, entries: list[FileEntry] | None, card: dict, tags: list[str],
               blobs: bool = False) -> dict:
    out = {
        "_id": repo.repo_id, "id": repo.repo_id, "author": repo.namespace,
        "sha": commit.oid, "lastModified": commit.created_at, "createdAt": repo.created_at,
        "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
        "tags": tags, "library_name": card.get("library_name"), "cardData": card or None,
    }
    if repo.type == "model":
        out["modelId"] = repo.repo_id
    if entries is not None:
        out["siblings"] = [sibling(e, blobs) for e in entries]
    return out


def repo_storage(repo: Repo, head: Commit, storage: int, total: int) -> dict:
    """One row of `list_user_repos` (`hf repos ls`)."""
    return {"id": repo.repo_id, "type": repo.type, "updatedAt": head.created_at,
            "visibility": "private" if repo.private else "public", "storage": storage,
            "storagePercent": 100 * storage / total if total else 0}


def tree_file(entry: FileEntry) -> dict:
    out = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": entry.path}
    if entry.lfs:
        out["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": len(lfs_pointer(entry.sha256, entry.size))}
    return out


def folder_entry(path: str, oids: list[str]) -> dict:
    """A folder of a tree listing; its oid is a hash over what it holds."""
    return {"type": "directory", "oid": hashlib.sha1("".join(sorted(oids)).encode()).hexdigest(), "size": 0, "path": path}


def paths_info(entries: list[FileEntry], paths: list[str]) -> list[dict]:
    """What `get_paths_info` asks: each of `paths` that is a file or a folder of the tree, in order."""
    out = []
    for path in dict.fromkeys(p.strip("/") for p in paths):
        exact = [e for e in entries if e.path == path]
        inside = [e.git_oid for e in entries if e.path.startswith(path + "/")]
        if exact:
            out.append(tree_file(exact[0]))
        elif inside:
            out.append(folder_entry(path, inside))
    return out


def tree_listing(entries: list[FileEntry], folder: str, recursive: bool) -> list[dict]:
    """Files and folders under `folder` ("" for the root): direct children, or all descendants."""
    prefix = folder.rstrip("/") + "/" if folder else ""
    inside = [e for e in entries if e.path.startswith(prefix)]
    folders: dict[str, list[str]] = {}
    files = []
    for entry in inside:
        rest = entry.path[len(prefix):]
        parts = rest.split("/")
        for depth in range(1, len(parts) if recursive else min(2, len(parts))):
            folders.setdefault(prefix + "/".join(parts[:depth]), []).append(entry.git_oid)
        if recursive or len(parts) == 1:
            files.append(tree_file(entry))
    dirs = [folder_entry(path, oids) for path, oids in folders.items()]
    return sorted(dirs + files, key=lambda item: (posixpath.dirname(item["path"]), item["type"] == "file", item["path"]))


def refs(repo_refs: dict) -> dict:
    return {
        "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": oid} for n, oid, _ in repo_refs["branch"]],
        # `message` is the registry's own: huggingface_hub's GitRefInfo does not read it
        "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": oid, "message": message}
                 for n, oid, message in repo_refs["tag"]],
        "converts": [],
    }


def commit_info(commit: Commit) -> dict:
    return {"id": commit.oid, "authors": [{"user": commit.author}], "date": commit.created_at,
            "title": commit.title, "message": commit.message}


def webhook(hook: Webhook) -> dict:
    """What huggingface_hub's `WebhookInfo` reads (the secret too: only its owner is shown a webhook)."""
    return {"id": hook.id, "url": hook.url, "job": None, "watched": [{"type": w.type, "name": w.name} for w in hook.watched],
            "domains": list(hook.domains), "secret": hook.secret, "disabled": hook.disabled}


def delivery_attempt(attempt: Attempt) -> dict:
    return {"delivery": attempt.delivery, "event": attempt.event, "attempt": attempt.attempt, "status": attempt.status,
            "error": attempt.error, "at": attempt.at}
