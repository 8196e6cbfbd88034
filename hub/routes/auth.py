"""Who a token stands for (`hf auth whoami`, `loradock hub login`), served by `loradock hub serve`."""

from fastapi import APIRouter

from hub import errors, views
from hub.routes.deps import CallerDep

router = APIRouter()


@router.get("/api/whoami-v2")
def whoami(who: CallerDep):
    if who is None:
        raise errors.Unauthorized("no token: log in with `loradock hub login`")
    return views.whoami(who)
