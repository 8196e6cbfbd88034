"""ASGI middleware that `loradock serve` adds to vLLM's OpenAI server (`--middleware
serve.middleware.LoradockMiddleware`): one small piece per concern, chained in the order a request
meets them (`PIECES`), the way vLLM adds its own (`vllm/entrypoints/serve/middleware/register.py`).
It runs before vLLM's own middleware. Which routes each piece applies to is `serve.routes`' table;
the error bodies, statuses and body handling they share are `serve.asgi`'s.

1. `authenticate`: with an API key, every route but /health needs it.
2. `templates`: a request body holding a chat template of the client's is a 400, on any route.
3. `follow`: a generation request naming an adapter by a tag or branch is sent on naming the commit
   that answers it now, and its response names the model as the client did, with the commit in a
   header; the registry's webhook deliveries land here.
4. `models`: GET /v1/models gains loradock's metadata per adapter, and the soft-prompt adapters.
5. `admission`: the adapter a request names is fetched and checked before it goes live (and a
   folder offered to POST /v1/load_lora_adapter checked); a chat request to an adapter is rendered
   with the adapter's own chat template.
6. `drain`: an unload waits for the requests using its adapter and holds new ones, up to a deadline.
7. `soft_prompts`: prompt-tuning and p-tuning adapters are answered through prompt embeddings.
8. `loads`: what vLLM loaded or unloaded by path is written down.

Each piece is an ASGI app built as `Piece(app, config)` (`serve.config.ServeConfig`); without the
configuration `loradock serve` hands over (vLLM started some other way) none of them runs.
"""

from serve import runtime
from serve.middleware.admission import Admission
from serve.middleware.authenticate import Authenticate
from serve.middleware.drain import Drain
from serve.middleware.follow import FollowRefs
from serve.middleware.loads import RecordLoads
from serve.middleware.models import AnnotateModels
from serve.middleware.soft_prompts import SoftPrompts
from serve.middleware.templates import RefuseClientTemplates

# Outermost first: the API key before anything else, a refused template before any adapter is fetched,
# a moving name pinned to its commit before anything reads the name, the admitted adapter before the
# drain holds its name, and the drain around everything that uses it.
PIECES = (Authenticate, RefuseClientTemplates, FollowRefs, AnnotateModels, Admission, Drain, SoftPrompts, RecordLoads)


def chain(app, config, pieces=PIECES):
    """`app` behind `pieces`, the first of them outermost."""
    for piece in reversed(pieces):
        app = piece(app, config)
    return app


class LoradockMiddleware:
    def __init__(self, app):
        self.app = app
        config = runtime.config()
        self.chained = app if config is None else chain(app, config)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        return await self.chained(scope, receive, send)
