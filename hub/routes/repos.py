"""Repos as a whole, served by `loradock hub serve`: create, delete, move and change settings;
list and search (per repo type, filtered by what the caller may see); the info of a revision;
and the repos of a user or organisation (`hf repos ls`)."""

from urllib.parse import unquote

from fastapi import APIRouter, Request

from hub import errors, views
from hub.accounts import Caller
from hub.cards import repo_tags
from hub.routes.deps import (BaseUrlDep, CallerDep, RegistryDep, error_response, page, page_bounds, paginate, repo_of,
                             writable_repo)
from hub.schemas import CreateRepo, DeleteRepo, MoveRepo, RepoSettings
from hub.storage import Registry

router = APIRouter()


def namespace_of(organization: str | None, who: Caller | None) -> str:
    """The organization named, else the caller's own namespace."""
    return organization or (who.user if who else "")


@router.post("/api/repos/create")
def create_repo(body: CreateRepo, registry: RegistryDep, base: BaseUrlDep, who: CallerDep):
    namespace, kind = namespace_of(body.organization, who), body.type or "model"
    url_path = f"{namespace}/{body.name}" if kind == "model" else f"{kind}s/{namespace}/{body.name}"
    try:
        repo = registry.create_repo(who, kind, namespace, body.name, body.visibility == "private" or bool(body.private))
    except errors.Conflict as e:
        return error_response(409, e.message, extra={"url": f"{base}/{url_path}"})  # the client reads `url` even on 409
    return {"url": f"{base}/{repo.url_path}", "name": repo.repo_id, "id": repo.repo_id}


@router.delete("/api/repos/delete")
def delete_repo(body: DeleteRepo, registry: RegistryDep, who: CallerDep):
    registry.delete_repo(who, body.type or "model", f"{namespace_of(body.organization, who)}/{body.name}")
    return {}


@router.post("/api/repos/move")
def move_repo(body: MoveRepo, registry: RegistryDep, who: CallerDep):
    namespace, _, name = body.fromRepo.partition("/")
    repo = writable_repo(registry, body.type, namespace, name, who)
    moved = registry.move_repo(who, repo, body.toRepo)
    return {"id": moved.repo_id}


@router.put("/api/{kind:kind}/{namespace}/{name}/settings")
def update_settings(kind: str, namespace: str, name: str, body: RepoSettings, registry: RegistryDep, who: CallerDep):
    repo = writable_repo(registry, kind, namespace, name, who)
    if body.gated not in (None, False):
        raise errors.NotSupported("gated repos are not supported by this registry: make the repo private instead")
    private = body.private if body.visibility is None else body.visibility == "private"
    updated = registry.update_settings(who, repo, private)
    return {"private": updated.private, "visibility": "private" if updated.private else "public"}


def listing(kind: str, request: Request, registry: Registry, who: Caller | None):
    """A page of the repos of `kind` the caller may see. Without a tag filter the query itself
    pages (LIMIT/OFFSET); a filter reads each visible repo's card (cached by its blob)."""
    params = request.query_params
    wanted, start, limit = params.getlist("filter"), *page_bounds(request)
    order = "created" if params.get("sort") == "createdAt" else "modified"
    window = {} if wanted else {"offset": start, "limit": limit + 1}
    items = []
    for listed in registry.list_repos(who, kind, params.get("search", ""), params.get("author", ""), order, **window):
        card = registry.card_of(listed.readme)
        tags = repo_tags(card)
        if all(f in tags for f in wanted):
            items.append(views.model_info(listed.repo, listed.head, None, card, tags))
    return page(items, request) if not wanted else paginate(items, request)


@router.get("/api/models")
def list_models(request: Request, registry: RegistryDep, who: CallerDep):
    return listing("model", request, registry, who)


@router.get("/api/datasets")
def list_datasets(request: Request, registry: RegistryDep, who: CallerDep):
    return listing("dataset", request, registry, who)


def info(registry: Registry, kind: str, namespace: str, name: str, revision: str, request: Request,
         who: Caller | None) -> dict:
    repo = repo_of(registry, kind, namespace, name, who)
    commit = registry.resolve(repo, unquote(revision))
    card = registry.card(commit)
    blobs = request.query_params.get("blobs") == "true"
    return views.model_info(repo, commit, registry.tree(commit), card, repo_tags(card), blobs)


@router.get("/api/{kind:kind}/{namespace}/{name}")
def repo_info(kind: str, namespace: str, name: str, request: Request, registry: RegistryDep, who: CallerDep):
    return info(registry, kind, namespace, name, "main", request, who)


@router.get("/api/{kind:kind}/{namespace}/{name}/revision/{revision:path}")
def repo_info_at(kind: str, namespace: str, name: str, revision: str, request: Request, registry: RegistryDep,
                 who: CallerDep):
    return info(registry, kind, namespace, name, revision, request, who)


def repo_storage(registry: Registry, namespace: str, request: Request, who: Caller | None):
    if who is None:
        raise errors.Unauthorized("listing repos with their storage needs a token: log in with `loradock hub login`")
    rows = registry.repos_of(who, namespace)
    total = sum(storage for _, _, storage in rows)
    return paginate([views.repo_storage(repo, head, storage, total) for repo, head, storage in rows], request)


@router.get("/api/settings/repositories")
def my_repos(request: Request, registry: RegistryDep, who: CallerDep):
    return repo_storage(registry, who.user if who else "", request, who)


@router.get("/api/organizations/{namespace}/settings/repositories")
def org_repos(namespace: str, request: Request, registry: RegistryDep, who: CallerDep):
    return repo_storage(registry, namespace, request, who)
