"""GET /v1/models: vLLM's listing, with a `loradock` field on each adapter's card (repo, revision,
commit sha, method, rank, headline metric), a card for each prompt-tuning adapter known, which
vLLM does not list, having never loaded it, and a card for each tag or branch clients have named
(`serve.follow`), with the commit it resolves to now (and the rollout splitting it, if one does)."""

import json

from serve import follow, runtime
from serve.asgi import send_whole
from serve.config import ServeConfig
from serve.routes import LISTED


class AnnotateModels:
    def __init__(self, app, config: ServeConfig):
        self.app, self.base_model = app, config.base_model

    async def __call__(self, scope, receive, send):
        if scope not in LISTED:
            return await self.app(scope, receive, send)
        return await self.app(scope, receive, self.annotated(send))

    def annotated(self, send):
        """Buffer vLLM's /v1/models answer and add our metadata to each adapter card."""
        start, chunks = {}, []

        async def wrapped(message):
            if message["type"] == "http.response.start":
                start.update(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            if start["status"] == 200:
                body = json.dumps(self.annotate(json.loads(body))).encode()
            await send_whole(send, start, body)

        return wrapped

    def annotate(self, listing: dict) -> dict:
        listing["data"] = listing.get("data", []) + soft_prompt_cards(listing.get("data", []), self.base_model)
        for card in listing["data"]:
            if card.get("parent"):
                adapter = runtime.known(card["id"]) or runtime.remember(card["id"], card["root"])
                card["loradock"] = adapter.info
        listing["data"] += followed_cards(listing["data"])
        return listing


def followed_cards(cards: list[dict]) -> list[dict]:
    """A card per followed name whose commit is served here now (loaded, or a prompt-tuning adapter
    known): that commit's card, under the name clients send."""
    follower = follow.follower()
    by_id = {card["id"]: card for card in cards}
    added = []
    for name, followed in sorted(follower.names.items() if follower else ()):
        pinned = by_id.get(follow.pinned_name(followed.ref.repo_id, followed.commit))
        if pinned is None:  # not loaded (yet, or refused): listed once it has answered
            continue
        card = {**pinned, "id": name, "loradock": {**pinned.get("loradock", {}), **followed.describe()}}
        if name in by_id:
            by_id[name]["loradock"] = card["loradock"]
        else:
            added.append(card)
    return added


def soft_prompt_cards(cards: list[dict], base_model: str) -> list[dict]:
    """vLLM's card for each prompt-tuning adapter it does not list (the shape of its LoRA cards)."""
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelPermission

    listed = {card["id"] for card in cards}
    return [ModelCard(id=a.name, root=str(a.path), parent=base_model, permission=[ModelPermission()]).model_dump()
            for a in runtime.soft_prompted() if a.name not in listed]
