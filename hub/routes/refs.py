"""Branches, tags and history of a repo, served by `loradock hub serve` (`list_repo_refs`,
`list_repo_commits`, `create_branch`, `delete_branch`, `create_tag`, `delete_tag`,
`super_squash_history`), for model and dataset repos."""

from urllib.parse import unquote

from fastapi import APIRouter, Request

from hub import errors, views
from hub.routes.deps import CallerDep, RegistryDep, paginate, repo_of, writable_repo
from hub.schemas import BranchBody, SquashBody, TagBody

router = APIRouter()


@router.get("/api/{kind:kind}/{namespace}/{name}/refs")
def refs(kind: str, namespace: str, name: str, registry: RegistryDep, who: CallerDep):
    return views.refs(registry.refs(repo_of(registry, kind, namespace, name, who)))


@router.get("/api/{kind:kind}/{namespace}/{name}/commits/{revision:path}")
def commits(kind: str, namespace: str, name: str, revision: str, request: Request, registry: RegistryDep,
            who: CallerDep):
    commit = registry.resolve(repo_of(registry, kind, namespace, name, who), unquote(revision))
    return paginate([views.commit_info(c) for c in registry.history(commit)], request)


@router.post("/api/{kind:kind}/{namespace}/{name}/tag/{revision:path}")
def create_tag(kind: str, namespace: str, name: str, revision: str, body: TagBody, registry: RegistryDep,
               who: CallerDep):
    registry.create_ref(who, writable_repo(registry, kind, namespace, name, who), "tag", body.tag, unquote(revision),
                        body.message)
    return {}


@router.delete("/api/{kind:kind}/{namespace}/{name}/tag/{tag:path}")
def delete_tag(kind: str, namespace: str, name: str, tag: str, registry: RegistryDep, who: CallerDep):
    registry.delete_ref(who, writable_repo(registry, kind, namespace, name, who), "tag", unquote(tag))
    return {}


@router.post("/api/{kind:kind}/{namespace}/{name}/branch/{branch:path}")
def create_branch(kind: str, namespace: str, name: str, branch: str, body: BranchBody, registry: RegistryDep,
                  who: CallerDep):
    repo = writable_repo(registry, kind, namespace, name, who)
    if body.emptyBranch:
        raise errors.NotSupported("empty branches are not supported by this registry: create the branch from a revision")
    registry.create_ref(who, repo, "branch", unquote(branch), body.startingPoint)
    return {}


@router.delete("/api/{kind:kind}/{namespace}/{name}/branch/{branch:path}")
def delete_branch(kind: str, namespace: str, name: str, branch: str, registry: RegistryDep, who: CallerDep):
    registry.delete_ref(who, writable_repo(registry, kind, namespace, name, who), "branch", unquote(branch))
    return {}


@router.post("/api/{kind:kind}/{namespace}/{name}/super-squash/{branch:path}")
def super_squash(kind: str, namespace: str, name: str, branch: str, body: SquashBody, registry: RegistryDep,
                 who: CallerDep):
    commit = registry.squash(who, writable_repo(registry, kind, namespace, name, who), unquote(branch), body.message)
    return {"commitId": commit.oid}
