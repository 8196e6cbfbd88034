"""No chat template of the client's: a request body that sets one anywhere is a 400, on every route.

`loradock serve` starts vLLM with --trust-request-chat-template, the only way vLLM 0.32 lets a
request be rendered with another template than the server's (`serve.middleware.admission` sets each
adapter's own on chat requests), so every client-sent one must stop here. vLLM reads the field on
/v1/chat/completions, /invocations, /tokenize, /v1/responses, /v1/messages, the render and batch
routes, and any route it adds later; a template renders in a sandbox, but a nested loop outlives the
render timeout. So it is refused at any depth of any JSON body, not per route: a wrapper route or a
new field nesting it deeper cannot carry one past. This runs right after the API key, before any
adapter is fetched.
"""

from loradock.errors import InvalidRequest
from serve.asgi import Body, error_body, has_body, read_json, respond, status_of
from serve.config import ServeConfig
from serve.routes import TEMPLATE_CHECKED

# The field vLLM renders a Jinja template from: at the top of a body, and inside chat_template_kwargs.
TEMPLATE_FIELD = "chat_template"


def client_template(body) -> str | None:
    """Where a request body sets a chat template: "chat_template", "chat_template_kwargs.chat_template",
    "metadata.x[0].chat_template"...; None when it sets none (a null one is unset to vLLM too)."""
    stack = [("", body)]  # a loop, not recursion: a body may nest deeper than Python's stack
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            if value.get(TEMPLATE_FIELD) is not None:
                return f"{where}.{TEMPLATE_FIELD}" if where else TEMPLATE_FIELD
            stack += [(f"{where}.{key}" if where else str(key), item) for key, item in value.items()]
        elif isinstance(value, list):
            stack += [(f"{where}[{i}]", item) for i, item in enumerate(value)]
    return None


def template_refusal(body: Body) -> bytes | None:
    """The 400 body for a request that sets a chat template (`client_template`); None otherwise. A body
    that is not JSON passes: vLLM parses it with the same json module, and refuses it."""
    if body.too_deep:  # nested past what json parses: it cannot be checked, so it does not pass
        return error_body(400, "the request body nests JSON too deeply to be checked; flatten it")
    field = client_template(body.json)
    if field is None:
        return None
    refused = InvalidRequest(f"{field} cannot be set by the client: each model is served with the chat template it "
                             f"was trained with, which loradock serve chooses; remove {field} from the request")
    return error_body(status_of(refused), refused.problem, field)


class RefuseClientTemplates:
    def __init__(self, app, config: ServeConfig):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope not in TEMPLATE_CHECKED or not has_body(scope):
            return await self.app(scope, receive, send)
        body, receive = await read_json(scope, receive)
        if (refused := template_refusal(body)) is not None:
            return await respond(send, 400, refused)  # InvalidRequest's status
        return await self.app(scope, receive, send)
