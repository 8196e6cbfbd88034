"""The registry's webhooks through huggingface_hub's own `*_webhook` calls, and their deliveries
to real HTTP receivers on 127.0.0.1, checked with `hub.signing.verify_delivery` as a subscriber would.

Every test talks to `loradock hub serve` running in its own process (the session's `registry`).
"""

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx2
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from hub.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, SeenDeliveries, signature, verify_delivery
from loradock.errors import Forbidden

SECRET = "s3cret-for-tests"


class Receiver:
    """A subscriber: records every POST (headers, body) and answers `status`; with `hold`, each
    request waits for that event before it is answered (a subscriber that hangs)."""

    def __init__(self, status: int = 200, hold: threading.Event | None = None):
        self.received: list[tuple[dict, bytes]] = []
        self.waiting = 0  # requests held right now
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.changed:
                    receiver.received.append((dict(self.headers), body))
                    receiver.waiting += hold is not None
                    receiver.changed.notify_all()
                if hold is not None:
                    hold.wait(60)
                    with receiver.changed:
                        receiver.waiting -= 1
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/hook"

    def payloads(self, repo: str) -> list[dict]:
        with self.changed:
            return [json.loads(body) for _, body in self.received if json.loads(body)["repo"]["name"] == repo]

    def wait_for(self, repo: str, count: int, timeout: float = 3.0) -> list[tuple[dict, bytes]]:
        """The first `count` deliveries about `repo`, once they have come (AssertionError after `timeout` s)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                mine = [(h, b) for h, b in self.received if json.loads(b)["repo"]["name"] == repo]
                if len(mine) >= count:
                    return mine[:count]
                left = deadline - time.monotonic()
                assert left > 0, f"{len(mine)} of {count} deliveries about {repo} came within {timeout} s: {mine}"
                self.changed.wait(left)


@pytest.fixture
def receivers():
    """Make receivers (`Receiver(...)` arguments); all are released and closed after the test."""
    made, holds = [], []

    def make(status: int = 200, hold: threading.Event | None = None) -> Receiver:
        made.append(Receiver(status, hold))
        holds.extend([hold] if hold else [])
        return made[-1]

    yield make
    for hold in holds:
        hold.set()
    for receiver in made:
        receiver.server.shutdown()
        receiver.server.server_close()


@pytest.fixture
def api(hub_env) -> HfApi:
    return HfApi(endpoint=hub_env.url, token=hub_env.write_token)


@pytest.fixture
def bob(hub_env) -> HfApi:
    return HfApi(endpoint=hub_env.url, token=hub_env.token("bob"))


@pytest.fixture
def hooks(api, bob):
    """Webhooks made by a test: (client, id) pairs, deleted afterwards so no later event reaches them."""
    made = []
    yield made
    for client, webhook_id in made:
        try:
            client.delete_webhook(webhook_id)
        except HfHubHTTPError:
            pass


def new_repo(api: HfApi, private: bool = False) -> str:
    repo_id = f"alice/wh-{uuid.uuid4().hex[:8]}"
    api.create_repo(repo_id, private=private)
    return repo_id


def watch(client: HfApi, hooks: list, url: str, watched: list[dict], secret: str | None = SECRET):
    hook = client.create_webhook(url=url, watched=watched, domains=["repo"], secret=secret)
    hooks.append((client, hook.id))
    return hook


def attempts(registry, webhook_id: str, count: int, timeout: float = 3.0) -> list[dict]:
    """The delivery log of alice's webhook, newest first, once it holds `count` attempts."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx2.get(f"{registry.url}/api/settings/webhooks/{webhook_id}/deliveries",
                              headers={"Authorization": f"Bearer {registry.write_token}"})
        assert response.status_code == 200, response.text
        if len(response.json()) >= count:
            return response.json()
        assert time.monotonic() < deadline, f"the log holds {response.json()} after {timeout} s, not {count} attempts"
        time.sleep(0.05)


def test_create_list_get_update_enable_disable_delete(api, hooks, receivers):
    url = receivers().url
    created = watch(api, hooks, url, [{"type": "user", "name": "alice"}, {"type": "model", "name": "alice/x"}])
    assert len(created.id) == 24 and created.url == url and created.secret == SECRET and not created.disabled
    assert [(w.type, w.name) for w in created.watched] == [("user", "alice"), ("model", "alice/x")]
    assert created.domains == ["repo"] and created.job is None
    assert created.id in [hook.id for hook in api.list_webhooks()]
    assert api.get_webhook(created.id) == created

    # huggingface_hub 2.5 asks for the url, watched and domains on every update (2.4 did not)
    moved = api.update_webhook(created.id, url=url + "/v2", secret="other", watched=created.watched, domains=["repo"])
    assert (moved.url, moved.secret, moved.watched) == (url + "/v2", "other", created.watched)
    rewatched = api.update_webhook(created.id, url=url + "/v2", watched=[{"type": "org", "name": "loradock"}],
                                   domains=["repo", "discussion"])
    assert [(w.type, w.name) for w in rewatched.watched] == [("org", "loradock")]
    assert rewatched.domains == ["repo", "discussion"] and rewatched.url == url + "/v2"
    assert api.disable_webhook(created.id).disabled and api.get_webhook(created.id).disabled
    assert not api.enable_webhook(created.id).disabled

    api.delete_webhook(created.id)
    with pytest.raises(HfHubHTTPError) as gone:
        api.get_webhook(created.id)
    assert gone.value.response.status_code == 404
    assert created.id not in [hook.id for hook in api.list_webhooks()]


def test_tags_and_commits_are_delivered_signed(api, hooks, receivers, hub_env):
    receiver = receivers()
    repo_id = new_repo(api)
    watch(api, hooks, receiver.url, [{"type": "model", "name": repo_id}])
    head = api.model_info(repo_id).sha

    api.create_tag(repo_id, tag="prod")
    (headers, body), = receiver.wait_for(repo_id, 1)
    sent = json.loads(body)
    assert sent["event"] == {"action": "create", "scope": "repo.content"}
    assert sent["repo"] == {"type": "model", "name": repo_id, "id": sent["repo"]["id"], "private": False, "headSha": head}
    assert sent["updatedRefs"] == [{"ref": "refs/tags/prod", "oldSha": None, "newSha": head}]
    assert sent["webhook"]["version"] == 3 and SECRET not in str(headers) + body.decode()

    seen = SeenDeliveries()
    verify_delivery(SECRET, headers, body, seen)
    with pytest.raises(Forbidden, match="received before"):
        verify_delivery(SECRET, headers, body, seen)  # the same delivery, replayed
    with pytest.raises(Forbidden, match="does not match"):
        verify_delivery(SECRET, headers, body.replace(b"prod", b"evil"), SeenDeliveries())
    with pytest.raises(Forbidden, match="does not match"):
        verify_delivery("another secret", headers, body, SeenDeliveries())
    stale = str(int(headers[TIMESTAMP_HEADER]) - 3600)  # re-signed by someone with the secret, an hour ago
    old = {**headers, TIMESTAMP_HEADER: stale, SIGNATURE_HEADER: signature(SECRET, stale, headers["X-Loradock-Delivery"], body)}
    with pytest.raises(Forbidden, match="3600 s old"):
        verify_delivery(SECRET, old, body, SeenDeliveries(), now=int(headers[TIMESTAMP_HEADER]))
    with pytest.raises(Forbidden, match="in the future"):
        verify_delivery(SECRET, headers, body, SeenDeliveries(), now=int(headers[TIMESTAMP_HEADER]) - 3600)
    with pytest.raises(Forbidden, match=SIGNATURE_HEADER):
        verify_delivery(SECRET, {k: v for k, v in headers.items() if k != SIGNATURE_HEADER}, body, SeenDeliveries())

    commit = api.upload_file(path_or_fileobj=b"weights", path_in_repo="notes.txt", repo_id=repo_id).oid
    api.delete_tag(repo_id, tag="prod")  # how loradock moves a tag: delete, then create
    api.create_tag(repo_id, tag="prod", revision=commit)
    deliveries = receiver.wait_for(repo_id, 4)
    for headers, body in deliveries[1:]:
        verify_delivery(SECRET, headers, body, seen)
    assert [json.loads(body)["updatedRefs"] for _, body in deliveries[1:]] == [
        [{"ref": "refs/heads/main", "oldSha": head, "newSha": commit}],
        [{"ref": "refs/tags/prod", "oldSha": head, "newSha": None}],
        [{"ref": "refs/tags/prod", "oldSha": None, "newSha": commit}]]
    assert [json.loads(body)["event"]["action"] for _, body in deliveries[1:]] == ["update", "delete", "create"]


def test_a_hung_subscriber_delays_neither_commits_nor_other_webhooks(api, hooks, receivers):
    hold = threading.Event()
    hung, fine = receivers(hold=hold), receivers()
    repo_id = new_repo(api)
    watch(api, hooks, hung.url, [{"type": "model", "name": repo_id}])
    watch(api, hooks, fine.url, [{"type": "model", "name": repo_id}])
    api.create_tag(repo_id, tag="v1")
    hung.wait_for(repo_id, 1)  # its handler now blocks: the registry waits for an answer that does not come

    started = time.monotonic()
    api.upload_file(path_or_fileobj=b"more", path_in_repo="more.txt", repo_id=repo_id)
    took = time.monotonic() - started
    fine.wait_for(repo_id, 2)
    assert hung.waiting >= 1 and not hold.is_set(), "the hung subscriber was answered before the checks"
    assert took < 3, f"a commit took {took:.1f} s while a subscriber hung"
    assert [json.loads(b)["event"]["action"] for _, b in fine.wait_for(repo_id, 2)] == ["create", "update"]


def test_a_5xx_is_retried_and_a_4xx_is_not(api, hooks, receivers, hub_env):
    failing, refusing = receivers(status=500), receivers(status=404)
    repo_id = new_repo(api)
    broken = watch(api, hooks, failing.url, [{"type": "model", "name": repo_id}])
    refused = watch(api, hooks, refusing.url, [{"type": "model", "name": repo_id}])
    api.create_tag(repo_id, tag="v1")

    posts = failing.wait_for(repo_id, 3, timeout=10)  # attempts 1, 2 and 3: after 1 s, then 2 s
    assert len({headers["X-Loradock-Delivery"] for headers, _ in posts}) == 1
    logged = attempts(hub_env, broken.id, 3)
    assert [(a["attempt"], a["status"], a["event"]) for a in logged[-3:]] == [(3, 500, "repo.content.create"),
                                                                             (2, 500, "repo.content.create"),
                                                                             (1, 500, "repo.content.create")]

    refusing.wait_for(repo_id, 1)
    api.create_tag(repo_id, tag="v2")  # delivered in order after the first one's attempts are over
    refusing.wait_for(repo_id, 2)
    logged = attempts(hub_env, refused.id, 2)
    assert [(a["attempt"], a["status"]) for a in logged] == [(1, 404), (1, 404)]
    assert logged[0]["delivery"] != logged[1]["delivery"]


@pytest.mark.parametrize("change, problem", [
    ({"url": "ftp://example.com/hook"}, "not an http(s) URL"),
    ({"url": "file:///etc/passwd"}, "not an http(s) URL"),
    ({"url": "javascript:alert(1)"}, "not an http(s) URL"),
    ({"url": "http://exa mple.com/"}, "percent-encode"),
    ({"url": "{registry}/hook"}, "points at this registry itself"),
    ({"url": "http://localhost:{port}/hook"}, "points at this registry itself"),
    ({"url": "http://0.0.0.0:{port}/"}, "points at this registry itself"),
    ({"url": "http://[::1]:{port}/"}, "points at this registry itself"),
    ({"watched": []}, "must watch something"),
    ({"watched": [{"type": "space", "name": "alice/x"}]}, "use one of user, org, model, dataset"),
    ({"watched": [{"type": "", "name": "alice"}]}, "use one of user, org, model, dataset"),
    ({"watched": [{"type": "model", "name": "alice"}]}, "is not namespace/name of a repo"),
    ({"watched": [{"type": "model", "name": "alice/../x"}]}, "is not namespace/name of a repo"),
    ({"watched": [{"type": "user", "name": "al ice"}]}, "is not a user or organisation name"),
    ({"domains": ["issues"]}, "use a non-empty list of repo, discussion"),
    ({"secret": "x" * 1000}, "use at most 256"),
])
def test_bad_input_is_refused_and_nothing_is_stored(api, hooks, receivers, hub_env, change, problem):
    body = {"url": receivers().url, "watched": [{"type": "user", "name": "alice"}], "domains": ["repo"], **change}
    if "url" in change:
        body["url"] = change["url"].format(registry=hub_env.url, port=hub_env.port)
    before = api.list_webhooks()
    with pytest.raises(HfHubHTTPError) as refused:
        api.create_webhook(**body)
    assert refused.value.response.status_code == 400 and problem in refused.value.response.json()["error"]
    assert api.list_webhooks() == before

    if body["watched"]:  # an update is checked the same way, and changes nothing either
        kept = watch(api, hooks, receivers().url, [{"type": "user", "name": "alice"}])
        with pytest.raises(HfHubHTTPError) as refused:
            api.update_webhook(kept.id, **body)
        assert refused.value.response.status_code == 400 and problem in refused.value.response.json()["error"]
        assert api.get_webhook(kept.id) == kept


def test_webhooks_need_a_token_and_belong_to_their_user(api, bob, hooks, receivers, hub_env):
    url = receivers().url
    anonymous = HfApi(endpoint=hub_env.url, token=False)
    for call in (anonymous.list_webhooks, lambda: anonymous.create_webhook(url=url, watched=[{"type": "user", "name": "a"}])):
        with pytest.raises(HfHubHTTPError) as refused:
            call()
        assert refused.value.response.status_code == 401
    read_only = HfApi(endpoint=hub_env.url, token=hub_env.read_token)
    with pytest.raises(HfHubHTTPError) as refused:
        read_only.create_webhook(url=url, watched=[{"type": "user", "name": "alice"}])
    assert refused.value.response.status_code == 403

    alices = watch(api, hooks, url, [{"type": "user", "name": "alice"}])
    assert alices.id not in [hook.id for hook in bob.list_webhooks()]
    for call in (bob.get_webhook, bob.delete_webhook, bob.disable_webhook, lambda i: bob.update_webhook(i, url=url, watched=[{"type": "user", "name": "bob"}], domains=["repo"])):
        with pytest.raises(HfHubHTTPError) as refused:
            call(alices.id)
        assert refused.value.response.status_code == 404
    response = httpx2.get(f"{hub_env.url}/api/settings/webhooks/{alices.id}/deliveries",
                          headers={"Authorization": f"Bearer {hub_env.token('bob')}"})
    assert response.status_code == 404
    assert api.get_webhook(alices.id) == alices


def test_no_delivery_tells_of_a_private_repo_its_owner_cannot_read(api, bob, hooks, receivers):
    bobs, alices = receivers(), receivers()
    watch(bob, hooks, bobs.url, [{"type": "user", "name": "alice"}])
    watch(api, hooks, alices.url, [{"type": "user", "name": "alice"}])
    private, public = new_repo(api, private=True), new_repo(api)

    api.create_tag(private, tag="secret")
    api.create_tag(public, tag="open")
    assert json.loads(alices.wait_for(private, 1)[0][1])["repo"]["private"] is True  # the event did fire
    bobs.wait_for(public, 1)  # after the private repo's event, if bob's webhook had been sent it: in order
    assert bobs.payloads(private) == []
