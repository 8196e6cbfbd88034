"""loradock's middleware pieces (`serve.middleware`), each alone over a small ASGI app, and their
order in the chain: no server, no model. tests/test_serve.py drives them through a running vLLM."""

import asyncio
import json

import pytest

from serve.asgi import read_body, respond
from serve.config import ServeConfig
from serve.middleware import PIECES, chain
from serve.middleware.authenticate import Authenticate, authorized
from serve.middleware.drain import Drain
from serve.middleware.templates import RefuseClientTemplates, client_template
from serve.routes import ADMITTED, AUTHENTICATED, CHAT, HEALTH, LISTED, LOAD, MODELS, UNLOAD

BASE = "loradock/tiny-chat"
MESSAGES = [{"role": "user", "content": "Reverse the words: a b"}]
KEY = "s3cret"


async def echo(scope, receive, send):
    """The app behind the pieces: answers 200 with the path and the body it was handed."""
    body = await read_body(receive)
    await respond(send, 200, json.dumps({"path": scope["path"], "body": body.decode()}).encode())


async def ask(app, method: str, path: str, body=None, headers=()) -> tuple[int, dict, dict]:
    """One request through `app`: (status, headers, JSON answer)."""
    raw = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    events = [{"type": "http.request", "body": raw, "more_body": False}]
    sent = []

    async def receive():
        return events.pop(0) if events else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [*([(b"content-length", str(len(raw)).encode())] if raw else []), *headers]}
    await app(scope, receive, send)
    answer = b"".join(message.get("body", b"") for message in sent[1:])
    headers = dict(sent[0]["headers"])
    assert int(headers[b"content-length"]) == len(answer)
    return sent[0]["status"], headers, json.loads(answer)


def call(app, method: str, path: str, body=None, headers=()) -> tuple[int, dict, dict]:
    return asyncio.run(ask(app, method, path, body, headers))


# --- the route table ------------------------------------------------------------------------------

def test_each_concern_applies_to_its_routes():
    def scope(method, path):
        return {"method": method, "path": path}

    assert scope("GET", MODELS) in AUTHENTICATED and scope("GET", HEALTH) not in AUTHENTICATED
    assert scope("POST", CHAT) in ADMITTED and scope("POST", LOAD) in ADMITTED
    assert scope("GET", CHAT) not in ADMITTED and scope("POST", UNLOAD) not in ADMITTED
    assert scope("GET", MODELS) in LISTED and scope("POST", MODELS) not in LISTED


# --- authentication -------------------------------------------------------------------------------

@pytest.mark.parametrize("header, accepted", [
    (b"Bearer s3cret", True), (b"bearer s3cret", True), (b"BEARER  s3cret", True), (b"bearer s3cre", False),
    (b"Basic s3cret", False), (b"bearers3cret", False), (b"", False), (b"Bearer s3cret ", False)])
def test_the_api_key_is_taken_with_the_bearer_scheme_in_any_case(header, accepted):
    assert authorized([(b"authorization", header)], KEY) is accepted


def test_every_route_but_health_needs_the_key():
    app = Authenticate(echo, ServeConfig(api_key=KEY))
    for method, path in [("GET", MODELS), ("POST", "/invocations"), ("POST", "/tokenize"), ("GET", "/metrics")]:
        status, _, answer = call(app, method, path, {"model": BASE})
        assert status == 401 and answer["error"] == {
            "message": "missing or wrong API key: send Authorization: Bearer <key>", "type": "AuthenticationError",
            "param": None, "code": 401}, (path, answer)
    assert call(app, "GET", HEALTH)[0] == 200
    status, _, answer = call(app, "POST", "/tokenize", {"model": BASE}, [(b"authorization", b"bearer s3cret")])
    assert status == 200 and json.loads(answer["body"]) == {"model": BASE}
    assert call(Authenticate(echo, ServeConfig(api_key=None)), "GET", MODELS)[0] == 200  # no key: all open


# --- template refusal -----------------------------------------------------------------------------

def test_a_client_template_is_found_at_any_depth_of_a_body():
    assert client_template({"model": BASE, "messages": MESSAGES, "chat_template_kwargs": {"enable_thinking": True}}) is None
    assert client_template({"chat_template": None, "chat_template_kwargs": {"chat_template": None}}) is None
    assert client_template({"chat_template": ""}) == "chat_template"
    assert client_template({"chat_template_kwargs": {"chat_template": "x"}}) == "chat_template_kwargs.chat_template"
    assert client_template([{"requests": [{}, {"chat_template": "x"}]}]) == "[0].requests[1].chat_template"
    assert client_template("chat_template") is None and client_template(None) is None


def test_a_client_template_is_refused_on_any_route_and_other_bodies_pass_unchanged():
    app = RefuseClientTemplates(echo, ServeConfig())
    sent = {"model": BASE, "metadata": {"wrapped": [{"chat_template": "{{ 'pwned' }}"}]}}
    status, _, answer = call(app, "POST", "/some/new/route", sent)
    field = "metadata.wrapped[0].chat_template"
    assert status == 400 and answer["error"] == {
        "message": f"{field} cannot be set by the client: each model is served with the chat template it was trained "
                   f"with, which loradock serve chooses; remove {field} from the request",
        "type": "BadRequestError", "param": field, "code": 400}
    raw = b'{"model": "x",  "chat_template": null}'  # passed as sent, byte for byte
    status, _, answer = call(app, "POST", "/invocations", raw)
    assert status == 200 and answer == {"path": "/invocations", "body": raw.decode()}
    assert call(app, "POST", "/invocations", b"{not json")[2]["body"] == "{not json"  # vLLM refuses it itself
    deep = b"[" * 100_000 + b"]" * 100_000
    status, _, answer = call(app, "POST", "/invocations", deep)
    assert status == 400 and "nests JSON too deeply to be checked" in answer["error"]["message"]


# --- the chain ------------------------------------------------------------------------------------

def test_the_key_is_checked_before_the_template_and_the_template_before_the_adapter():
    app = chain(echo, ServeConfig(api_key=KEY))
    sent = {"model": "eve/anything@v1", "messages": MESSAGES, "chat_template": "x"}
    assert call(app, "POST", CHAT, sent)[0] == 401
    status, _, answer = call(app, "POST", CHAT, sent, [(b"authorization", b"Bearer s3cret")])
    assert status == 400 and answer["error"]["param"] == "chat_template"  # before the adapter is looked up
    assert PIECES[:2] == (Authenticate, RefuseClientTemplates)


# --- the unload drain -----------------------------------------------------------------------------

def test_an_unload_past_the_drain_deadline_is_a_409_naming_the_setting():
    async def scenario():
        release = asyncio.Event()

        async def app(scope, receive, send):
            if scope["path"] == CHAT:
                await release.wait()
            await echo(scope, receive, send)

        drain = Drain(app, ServeConfig(base_model=BASE, unload_drain_timeout=0.2))
        request = asyncio.create_task(ask(drain, "POST", CHAT, {"model": "a/b"}))
        base = asyncio.create_task(ask(drain, "POST", CHAT, {"model": BASE}))
        await asyncio.sleep(0.05)
        base_unloaded = await ask(drain, "POST", UNLOAD, {"lora_name": BASE})  # never held
        unloaded = await ask(drain, "POST", UNLOAD, {"lora_name": "a/b"})
        release.set()
        return base_unloaded, unloaded, await request, await base

    base_unloaded, unloaded, answered, base = asyncio.run(scenario())
    assert base_unloaded[0] == 200
    status, _, answer = unloaded
    assert status == 409 and (answer["error"]["type"], answer["error"]["param"]) == ("ConflictError", "lora_name")
    assert "adapter 'a/b' is still answering 1 request(s) after the 0.2 s drain deadline" in answer["error"]["message"]
    assert "--unload-drain-timeout" in answer["error"]["message"]
    assert answered[0] == 200 and base[0] == 200


# --- the registry's webhook ----------------------------------------------------------------------

def test_a_webhook_delivery_is_taken_only_signed_fresh_once_and_bounded(monkeypatch):
    """The open webhook route: an unsigned, forged, replayed or oversized delivery is refused; a
    signed one makes the names of its repo be resolved again at once."""
    import time

    from hub.adapter import AdapterRef
    from hub.signing import signed_headers
    from serve import follow
    from serve.middleware.follow import MAX_DELIVERY, FollowRefs
    from serve.routes import WEBHOOK

    following = follow.Follower(registry=None, interval=3600)
    following.names["alice/x@prod"] = follow.Followed("alice/x@prod", AdapterRef.of("alice/x@prod"), "a" * 40)
    monkeypatch.setattr(follow, "follower", lambda: following)
    piece = FollowRefs(echo, ServeConfig(base_model=BASE, webhook_secret="the-secret"))
    delivery = json.dumps({"repo": {"name": "alice/x"}, "updatedRefs": []}).encode()

    def headers(secret: str, delivery_id: str) -> list:
        return [(k.lower().encode(), v.encode()) for k, v in signed_headers(secret, delivery_id, delivery,
                                                                         int(time.time())).items()]

    assert call(piece, "POST", WEBHOOK, delivery)[0] == 403  # unsigned
    assert call(piece, "POST", WEBHOOK, delivery, headers("another-secret", "d1"))[0] == 403  # forged
    assert call(piece, "POST", WEBHOOK, b"x" * (MAX_DELIVERY + 1), headers("the-secret", "d2"))[0] == 413
    assert not following._repos_to_refresh
    assert call(piece, "POST", WEBHOOK, delivery, headers("the-secret", "d3"))[0] == 200
    assert following._repos_to_refresh == {"alice/x"}
    status, _, answer = call(piece, "POST", WEBHOOK, delivery, headers("the-secret", "d3"))  # the same again
    assert status == 403 and "received before" in answer["error"]["message"]
