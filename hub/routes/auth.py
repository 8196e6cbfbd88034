"""Who a token stands for (`hf auth whoami`, `loradock hub login`), and whether the registry is up
(`/health`, what process supervisors and loradock's own tools wait on), served by `loradock hub serve`."""

from fastapi import APIRouter

from hub import errors, views
from hub.routes.deps import CallerDep

router = APIRouter()


@router.get("/health")
def health():
    return {"status": "ok"}


@router.get("/api/whoami-v2")
def whoami(who: CallerDep):
    if who is None:
        raise errors.Unauthorized("no token: log in with `loradock hub login`")
    return views.whoami(who)
