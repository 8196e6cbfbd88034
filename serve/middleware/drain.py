"""The unload drain: an unload waits for the requests already using that adapter and holds new ones
back until it is done, for `--unload-drain-timeout` seconds at most (`serve.inflight.InFlight`);
past that the unload answers 409, nothing is unloaded, and the held requests go on.

vLLM checks a request's model name, then looks the adapter up again later: an unload in between
would turn an accepted request into a 404. The gate covers everything after this piece, soft-prompt
adapters (`serve.middleware.soft_prompts`) included; the base model is never unloaded, so never held.
"""

import contextlib

from loradock.errors import Busy
from serve.asgi import Body, JsonPiece, refusal, respond
from serve.config import ServeConfig
from serve.inflight import InFlight
from serve.routes import DRAINED, UNLOAD


class Drain(JsonPiece):
    routes = DRAINED

    def __init__(self, app, config: ServeConfig):
        super().__init__(app, config)
        self.in_flight = InFlight(config.unload_drain_timeout)

    async def handle(self, scope, body: Body, receive, replayed, send):
        async with contextlib.AsyncExitStack() as held:
            try:
                await held.enter_async_context(self.gate(scope["path"], body.json))
            except Busy as e:
                return await respond(send, *refusal(e, "lora_name"))
            return await self.app(scope, replayed, send)

    def gate(self, path: str, body) -> contextlib.AbstractAsyncContextManager:
        """An unload's hold on the adapter it names (`lora_name`), or a request's use of the one it
        names (`model`); nothing for the base model or a body that names none."""
        name = body.get("lora_name" if path == UNLOAD else "model") if isinstance(body, dict) else None
        if not isinstance(name, str) or name == self.config.base_model:
            return contextlib.nullcontext()
        return self.in_flight.unloading(name) if path == UNLOAD else self.in_flight.using(name)
