"""The registry's HTTP routes, one `APIRouter` per area, mounted by `hub.server.create_app`
(run by `loradock hub serve`). Each route parses, calls `hub.storage.Registry` and shapes the JSON
with `hub.views`; the errors it lets through are mapped to status codes in `hub.server` only."""

from hub.routes import auth, cards, commits, files, refs, repos, unsupported, webhooks

ROUTERS = (auth.router, cards.router, repos.router, files.router, refs.router, commits.router, webhooks.router,
           unsupported.router)  # last: it takes every path the others do not
