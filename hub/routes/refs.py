"""Branches, tags and history of a repo, served by `loradock hub serve` (`list_repo_refs`,
`list_repo_commits`, `create_tag`, `delete_tag`)."""

from urllib.parse import unquote

from fastapi import APIRouter, Request

from hub import views
from hub.routes.deps import CallerDep, RegistryDep, paginate, repo_of
from hub.schemas import TagBody

router = APIRouter()


@router.get("/api/models/{namespace}/{name}/refs")
def refs(namespace: str, name: str, registry: RegistryDep, who: CallerDep):
    return views.refs(registry.refs(repo_of(registry, namespace, name, who)))


@router.get("/api/models/{namespace}/{name}/commits/{revision:path}")
def commits(namespace: str, name: str, revision: str, request: Request, registry: RegistryDep, who: CallerDep):
    commit = registry.resolve(repo_of(registry, namespace, name, who), unquote(revision))
    return paginate([views.commit_info(c) for c in registry.history(commit)], request)


@router.post("/api/models/{namespace}/{name}/tag/{revision:path}")
def create_tag(namespace: str, name: str, revision: str, body: TagBody, registry: RegistryDep, who: CallerDep):
    registry.create_tag(who, repo_of(registry, namespace, name, who), body.tag, unquote(revision))
    return {}


@router.delete("/api/models/{namespace}/{name}/tag/{tag:path}")
def delete_tag(namespace: str, name: str, tag: str, registry: RegistryDep, who: CallerDep):
    registry.delete_tag(who, repo_of(registry, namespace, name, who), unquote(tag))
    return {}
