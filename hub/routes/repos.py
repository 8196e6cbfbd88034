"""Repos as a whole, served by `loradock hub serve`: create and delete, list and search, the model
info of a revision, and the model card check."""

from urllib.parse import unquote

from fastapi import APIRouter, Request

from hub import errors, views
from hub.cards import repo_tags
from hub.routes.deps import BaseUrlDep, CallerDep, RegistryDep, error_response, paginate, repo_of
from hub.schemas import CreateRepo, DeleteRepo
from hub.storage import Caller, Registry

router = APIRouter()


def namespace_of(organization: str | None, who: Caller | None) -> str:
    """The organization named, else the caller's own namespace."""
    return organization or (who.user if who else "")


@router.post("/api/repos/create")
def create_repo(body: CreateRepo, registry: RegistryDep, base: BaseUrlDep, who: CallerDep):
    namespace = namespace_of(body.organization, who)
    url = f"{base}/{namespace}/{body.name}"
    try:
        registry.create_repo(who, namespace, body.name, body.visibility == "private" or bool(body.private))
    except errors.Conflict as e:
        return error_response(409, e.message, extra={"url": url})  # the client reads `url` even on 409
    return {"url": url, "name": f"{namespace}/{body.name}"}


@router.delete("/api/repos/delete")
def delete_repo(body: DeleteRepo, registry: RegistryDep, who: CallerDep):
    registry.delete_repo(who, f"{namespace_of(body.organization, who)}/{body.name}")
    return {}


@router.get("/api/models")
def list_models(request: Request, registry: RegistryDep, who: CallerDep, search: str = "", author: str = "",
                sort: str = "lastModified"):
    wanted = request.query_params.getlist("filter")
    items = []
    for repo in registry.list_repos(who):
        if (search and search.lower() not in repo.repo_id.lower()) or (author and repo.namespace != author):
            continue
        head = registry.resolve(repo, "main")
        card = registry.card(head)
        tags = repo_tags(card)
        if all(f in tags for f in wanted):
            items.append(views.model_info(repo, head, None, card, tags))
    key = {"createdAt": "createdAt", "lastModified": "lastModified"}.get(sort, "lastModified")
    items.sort(key=lambda m: m[key], reverse=True)
    return paginate(items, request)


def info(registry: Registry, namespace: str, name: str, revision: str, request: Request, who: Caller | None) -> dict:
    repo = repo_of(registry, namespace, name, who)
    commit = registry.resolve(repo, unquote(revision))
    card = registry.card(commit)
    blobs = request.query_params.get("blobs") == "true"
    return views.model_info(repo, commit, registry.tree(commit), card, repo_tags(card), blobs)


@router.get("/api/models/{namespace}/{name}")
def model_info(namespace: str, name: str, request: Request, registry: RegistryDep, who: CallerDep):
    return info(registry, namespace, name, "main", request, who)


@router.get("/api/models/{namespace}/{name}/revision/{revision:path}")
def model_info_at(namespace: str, name: str, revision: str, request: Request, registry: RegistryDep, who: CallerDep):
    return info(registry, namespace, name, revision, request, who)
