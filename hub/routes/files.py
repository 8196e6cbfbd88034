"""The files of a revision, served by `loradock hub serve`: downloads (`hf_hub_download`, with
Range and HEAD) and the tree listing (`list_repo_tree`)."""

from urllib.parse import unquote

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from hub import errors, views
from hub.routes.deps import CallerDep, RegistryDep, paginate, repo_of

router = APIRouter()


class BlobResponse(FileResponse):
    """FileResponse reads 64 KiB at a time, each read a hop to a worker thread; blobs are large."""

    chunk_size = 4 << 20


@router.api_route("/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
def resolve(namespace: str, name: str, revision: str, path: str, request: Request, registry: RegistryDep,
            who: CallerDep):
    commit = registry.resolve(repo_of(registry, namespace, name, who), unquote(revision))
    request.state.commit = commit.oid  # sent with a 404 too, as the Hub does
    entry = registry.file(commit, path)
    etag = entry.sha256 if entry.lfs else entry.git_oid
    headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{etag}"', "X-Linked-Size": str(entry.size)}
    if entry.lfs:
        headers["X-Linked-Etag"] = f'"{entry.sha256}"'
    return BlobResponse(registry.blob_path(entry), headers=headers, media_type="application/octet-stream")


@router.get("/api/models/{namespace}/{name}/tree/{revision}")
@router.get("/api/models/{namespace}/{name}/tree/{revision}/{folder:path}")
def tree(namespace: str, name: str, revision: str, request: Request, registry: RegistryDep, who: CallerDep,
         folder: str = ""):
    commit = registry.resolve(repo_of(registry, namespace, name, who), unquote(revision))
    folder = unquote(folder).strip("/")
    entries = registry.tree(commit)
    if folder and not any(e.path.startswith(folder + "/") for e in entries):
        raise errors.EntryNotFound(f"{folder} does not exist at revision {commit.oid}")
    return paginate(views.tree_listing(entries, folder, request.query_params.get("recursive") == "true"), request)
