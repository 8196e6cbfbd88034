"""The API key: with `--api-key`, every route but the open ones (`serve.routes.OPEN`: /health) needs
`Authorization: Bearer KEY`. vLLM's own check guards only /v1, /v2, /inference and /cohere, leaving
/invocations, /adapters, /tokenize, /metrics and others open; this piece runs before anything else."""

import hmac

from serve.asgi import error_body, respond
from serve.config import ServeConfig
from serve.routes import AUTHENTICATED


def authorized(headers, key: str) -> bool:
    """`Authorization: Bearer KEY`, the scheme in any case (RFC 9110 section 11.1: `bearer` is as good)."""
    header = dict(headers).get(b"authorization", b"")
    scheme, _, credentials = header.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.lstrip(b" "), key.encode())


class Authenticate:
    def __init__(self, app, config: ServeConfig):
        self.app, self.key = app, config.api_key

    async def __call__(self, scope, receive, send):
        if self.key and scope in AUTHENTICATED and not authorized(scope["headers"], self.key):
            return await respond(send, 401, error_body(401, "missing or wrong API key: send Authorization: Bearer <key>"))
        return await self.app(scope, receive, send)
