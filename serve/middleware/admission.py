"""Name resolution and adapter admission: an adapter is checked (`hub.adapter.checks.check_folder`)
before it goes live, so a refusal is a 400 naming the problem rather than a 500 from vLLM's worker.

- A generation request naming a registry adapter vLLM has not seen (`org/name[@revision]`) has it
  fetched here, on its first request, before vLLM's resolver would: pulled, pinned, checked, and
  refused with its own status (`serve.asgi.STATUS`: a namespace this server does not hot-load from
  is a 403, the registry down a 503...). The adapter admitted is left in the scope (`ADMITTED`) for
  the pieces after this one.
- A chat request to an adapter whose chat template differs from the base model's is rendered with
  the adapter's (the one it was trained with): the body sent on carries it as `chat_template`.
- POST /v1/load_lora_adapter has its folder checked; how that folder is served (LoRA in vLLM, or a
  soft prompt) is left in the scope (`SERVED_BY`).
"""

import asyncio

from hub.adapter import method_of
from hub.adapter.checks import check_folder
from loradock.errors import LoradockError, NotFound
from serve import runtime
from serve.asgi import Body, JsonPiece, refusal, respond, rewritten
from serve.config import ServeConfig
from serve.routes import ADMITTED as ROUTES
from serve.routes import CHAT, GENERATION

ADMITTED = "loradock.adapter"  # scope key: the adapter a generation request names (None: the base, or unknown)
SERVED_BY = "loradock.served_by"  # scope key: how the folder a load offers is served (hub.adapter.SERVED_AS)


class Admission(JsonPiece):
    routes = ROUTES

    def __init__(self, app, config: ServeConfig):
        super().__init__(app, config)
        self._base_template: str | None = None
        self._base_template_read = False

    async def handle(self, scope, body: Body, receive, replayed, send):
        if not isinstance(body.json, dict):
            return await self.app(scope, replayed, send)
        scope = dict(scope)
        try:
            if scope["path"] in GENERATION:
                adapter = scope[ADMITTED] = await self.adapter_for(body.json)
                if (template := self.template_for(scope["path"], adapter)) is not None:
                    scope, replayed = rewritten(scope, receive, {**body.json, "chat_template": template})
            elif body.json.get("lora_path"):
                # Off the event loop: the first check of a weights file reads all of it.
                config = await asyncio.to_thread(check_folder, body.json["lora_path"], runtime.served_base())
                scope[SERVED_BY] = method_of(config).served_by
        except LoradockError as e:
            return await respond(send, *refusal(e, "model"))
        return await self.app(scope, replayed, send)

    async def adapter_for(self, body: dict) -> "runtime.Adapter | None":
        """The adapter a generation request names, fetched from the registry on its first request
        (before vLLM's resolver, so the check, the template and soft prompts apply); None for the
        base model or a name vLLM may still know."""
        name = body.get("model")
        if not isinstance(name, str) or name == self.config.base_model:
            return None
        adapter = runtime.known(name)
        if adapter is None:
            try:
                adapter = await runtime.fetch(name)
            except NotFound:
                return None  # vLLM answers 404 for the model
        return adapter

    def template_for(self, path: str, adapter: "runtime.Adapter | None") -> str | None:
        """The chat template to render a request with, when it is not the base model's; None otherwise
        (soft-prompt adapters are rendered by `serve.middleware.soft_prompts`)."""
        if (path == CHAT and adapter and not adapter.soft_prompt and adapter.chat_template
                and adapter.chat_template != self.base_template()):
            return adapter.chat_template
        return None

    def base_template(self) -> str | None:
        if not self._base_template_read:
            from transformers import AutoTokenizer

            self._base_template = AutoTokenizer.from_pretrained(self.config.base_path).chat_template
            self._base_template_read = True
        return self._base_template
