"""Prompt-tuning and p-tuning adapters, which vLLM cannot load as LoRA and never sees by name.

A generation request to one (admitted by `serve.middleware.admission`) is rendered and tokenized by
vLLM's own /tokenize, embedded behind the adapter's soft prompt (`serve.soft_prompt`, the protocol
without HTTP) and answered by vLLM's /v1/completions for the base model, in-process, then translated
back into the endpoint the client called. Loading such an adapter by path, and unloading it, is done
here: it has no state in vLLM. This piece runs inside the unload drain (`serve.middleware.drain`).
"""

import asyncio
import json

from loradock.errors import InvalidRequest, LoradockError
from serve import runtime, soft_prompt
from serve.asgi import Body, JsonPiece, refusal, replay, respond, send_whole, with_path
from serve.middleware.admission import ADMITTED, SERVED_BY
from serve.routes import COMPLETIONS, GENERATION, LOAD, SOFT_PROMPTED, TOKENIZE, UNLOAD


class SoftPrompts(JsonPiece):
    routes = SOFT_PROMPTED

    async def handle(self, scope, body: Body, receive, replayed, send):
        path, adapter = scope["path"], scope.get(ADMITTED)
        if path in GENERATION and adapter is not None and adapter.soft_prompt:
            return await self.answer(scope, receive, send, body.json, adapter)
        if path == LOAD and scope.get(SERVED_BY) == "prompt-embeds":
            try:
                return await self.load(send, body.json)
            except LoradockError as e:
                return await respond(send, *refusal(e, "model"))
        if path == UNLOAD and isinstance(body.json, dict) and getattr(
                runtime.known(str(body.json.get("lora_name"))), "soft_prompt", False):
            return await self.unload(send, body.json["lora_name"])
        return await self.app(scope, replayed, send)

    async def answer(self, scope, receive, send, body: dict, adapter: "runtime.Adapter"):
        """Render and tokenize with vLLM's /tokenize, prepend the soft prompt to the tokens'
        embeddings, generate with vLLM's /v1/completions for the base, translate the answer back."""
        path, cfg = scope["path"], self.config
        try:
            asked = soft_prompt.tokenize_body(body, path, cfg.base_model, adapter.chat_template)
            status, answer = await self.call(scope, receive, TOKENIZE, asked)
            if status != 200:
                return await respond(send, status, answer)
            tokenized = json.loads(answer)
            n_virtual = (await asyncio.to_thread(soft_prompt.soft_prompt, adapter.path)).shape[0]
            soft_prompt.check_length(n_virtual, tokenized["count"], soft_prompt.requested_max_tokens(body, path),
                                     tokenized["max_model_len"])
            embeds = await asyncio.to_thread(soft_prompt.prompt_embeds, cfg.base_path, adapter.path,
                                             tokenized["tokens"])
        except LoradockError as e:
            return await respond(send, *refusal(e))
        raw = json.dumps(soft_prompt.completion_body(body, path, cfg.base_model, embeds)).encode()
        translation = soft_prompt.Translation(path, adapter.name,
                                              tokenized["tokens"] if body.get("return_token_ids") else None)
        return await self.app(with_path(scope, COMPLETIONS, raw), replay(raw, receive), translated(send, translation))

    async def call(self, scope, receive, path: str, body: dict) -> tuple[int, bytes]:
        """POST `body` to one of vLLM's own routes, in-process: (status, response body)."""
        raw, status, chunks = json.dumps(body).encode(), {}, []

        async def collect(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            else:
                chunks.append(message.get("body", b""))

        await self.app(with_path(scope, path, raw), replay(raw, receive), collect)
        return status["code"], b"".join(chunks)

    @staticmethod
    async def load(send, body: dict):
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("lora_name is required: the name clients will send as `model`")
        await asyncio.to_thread(soft_prompt.soft_prompt, body["lora_path"])  # read once, now
        runtime.loaded_by_path(name, body["lora_path"])
        await respond(send, 200, f"Success: prompt-tuning adapter '{name}' added successfully.".encode(), b"text/plain")

    @staticmethod
    async def unload(send, name: str):
        runtime.forget(name)  # inside the drain's hold on `name`: no request uses it any more
        await respond(send, 200, f"Success: prompt-tuning adapter '{name}' removed successfully.".encode(), b"text/plain")


def translated(send, translation: "soft_prompt.Translation"):
    """A `send` that turns vLLM's answer for the base into the client's: a JSON body whole, a
    server-sent event stream event by event. Errors (any other status) pass through as they are."""
    state, pending = {}, bytearray()

    async def wrapped(message):
        if message["type"] == "http.response.start":
            state["ok"] = message["status"] == 200
            state["stream"] = dict(message.get("headers", [])).get(b"content-type", b"").startswith(b"text/event-stream")
            state["start"] = message
            if not state["ok"] or state["stream"]:
                await send(message)
            return
        if not state["ok"]:
            return await send(message)
        pending.extend(message.get("body", b""))
        more = message.get("more_body", False)
        if not state["stream"]:
            if not more:
                await send_whole(send, state["start"], json.dumps(translation.body(json.loads(pending))).encode())
            return
        events, _, rest = bytes(pending).rpartition(b"\n\n")
        pending[:] = rest
        out = "".join(f"data: {data}\n\n" for event in events.split(b"\n\n") if event.strip()
                      for data in translation.event(event.decode().removeprefix("data:").strip()))
        await send({"type": "http.response.body", "body": out.encode(), "more_body": more})

    return wrapped
