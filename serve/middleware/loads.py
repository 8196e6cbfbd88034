"""What vLLM loaded and unloaded by path: a 200 from vLLM's POST /v1/load_lora_adapter or
/v1/unload_lora_adapter is written down (`serve.runtime.loaded_by_path`, `serve.runtime.forget`), so
that /v1/models can describe the adapter and a restart of vLLM (`loradock serve --restart-engine`)
loads it again. Innermost of loradock's pieces: it sees only what reaches vLLM."""

from serve import runtime
from serve.asgi import Body, JsonPiece
from serve.routes import LOAD, RECORDED


class RecordLoads(JsonPiece):
    routes = RECORDED

    async def handle(self, scope, body: Body, receive, replayed, send):
        if not isinstance(body.json, dict):
            return await self.app(scope, replayed, send)
        return await self.app(scope, replayed, recorded(send, scope["path"], body.json))


def recorded(send, path: str, body: dict):
    """A `send` that records the load or unload once vLLM's whole 200 answer is on its way."""
    status = {}

    async def wrapped(message):
        if message["type"] == "http.response.start":
            status["code"] = message["status"]
        elif message["type"] == "http.response.body" and not message.get("more_body") and status.get("code") == 200:
            if path == LOAD:
                runtime.loaded_by_path(body["lora_name"], body["lora_path"])
            else:
                runtime.forget(body.get("lora_name", ""))
        await send(message)

    return wrapped
