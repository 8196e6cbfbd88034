"""Every parser of the registry is bounded: a README's front matter, validate-yaml, request bodies,
paths and the error header. And a sweep of bad input at every route: each answer a 4xx in the
Hub's shape on a connection that stays open, nothing committed, the registry up afterwards. So is
the time a client may take over its request, and a full disk is a 507 that keeps nothing.

    flock /tmp/loradock-heavy.lock .venv/bin/python -m pytest -q tests/test_hub_limits.py

Requests a well-behaved client would not send go through `Connection`, a raw socket.
"""

import contextlib
import hashlib
import json
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Self
from urllib.parse import quote

import httpx2
import pytest
import yaml

from tests.conftest import adapter_folder

MiB = 1 << 20
DEEP_CARD = "---\nx: " + "[" * 600 + "]" * 600 + "\n---\n# deep\n"
LAUGHS_CARD = "---\n" + "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcde", "bcdef")) + "---\n# laughs\n"


def api_for(registry, token):
    from hub.client import hub_api

    return hub_api(registry.url, token)


# --- raw HTTP -------------------------------------------------------------------------------------

@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # names lower-cased; values as sent, read as latin-1
    body: bytes

    def json(self):
        return json.loads(self.body)


class Connection:
    """One keep-alive HTTP/1.1 connection to the registry, for requests that httpx would refuse
    to send; `request` returns None when the connection drops before a whole answer came."""

    def __init__(self, registry, timeout: float = 60):
        self.sock = socket.create_connection(("127.0.0.1", registry.port), timeout=timeout)
        self.buffer = b""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def request(self, method: str, target: str | bytes, headers: dict | None = None, body=b"",
                chunked: bool = False) -> Reply | None:
        target = target.encode() if isinstance(target, str) else target
        lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1"]
        headers = {k.lower(): v for k, v in (headers or {}).items()}
        if chunked:
            headers["transfer-encoding"] = "chunked"
        elif "content-length" not in headers and (body or method in ("POST", "PUT")):
            headers["content-length"] = str(len(body))
        lines += [k.encode() + b": " + (v if isinstance(v, bytes) else v.encode()) for k, v in headers.items()]
        try:
            self.sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
            if chunked:
                for chunk in body:
                    self.sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.sock.sendall(b"0\r\n\r\n")
            else:
                self.sock.sendall(body)
        except OSError:
            pass  # the server may answer before it has read everything: read what it said
        try:
            return self.read_reply(method)
        except (OSError, ValueError):
            return None

    def read_reply(self, method: str) -> Reply:
        head = self.read_until(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(status_line.split()[1])
        if method == "HEAD" or status in (204, 304):
            return Reply(status, headers, b"")
        if "content-length" in headers:
            return Reply(status, headers, self.read_exactly(int(headers["content-length"])))
        body = b""
        while (size := int(self.read_until(b"\r\n"), 16)) > 0:
            body += self.read_exactly(size)
            self.read_until(b"\r\n")
        self.read_until(b"\r\n")
        return Reply(status, headers, body)

    def fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("closed by the server")
        self.buffer += data

    def read_until(self, end: bytes) -> bytes:
        while end not in self.buffer:
            self.fill()
        out, _, self.buffer = self.buffer.partition(end)
        return out

    def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self.fill()
        out, self.buffer = self.buffer[:size], self.buffer[size:]
        return out


def hub_error_problem(reply: Reply | None, method: str = "GET") -> str | None:
    """What is wrong with an answer to bad input, or None: it must be a whole 4xx in the Hub's
    error shape (`{"error": ...}` and a printable-ASCII `X-Error-Message`)."""
    if reply is None:
        return "the connection dropped without an answer"
    if not 400 <= reply.status < 500:
        return f"status {reply.status}"
    message = reply.headers.get("x-error-message")
    if message is None or not (message.isascii() and message.isprintable()):
        return f"X-Error-Message {message!r} is missing or not printable ASCII"
    if method == "HEAD":
        return None
    try:
        assert isinstance(reply.json(), dict) and "error" in reply.json()
    except (ValueError, AssertionError):
        return f"the body is not the Hub's error shape: {reply.body[:200]!r}"
    return None


def healthy(registry) -> bool:
    try:
        return httpx2.get(f"{registry.url}/health", timeout=10).status_code == 200
    except httpx2.HTTPError:
        return False


# --- 1. card front matter -------------------------------------------------------------------------

def push_unchecked_readme(api, repo_id: str, text: str, monkeypatch) -> None:
    """README.md committed by a client that skips validate-yaml (the real client otherwise refuses it first)."""
    from huggingface_hub import HfApi

    api.create_repo(repo_id, exist_ok=True)
    with monkeypatch.context() as patch:
        patch.setattr(HfApi, "_validate_yaml", lambda self, *args, **kwargs: None)
        api.upload_file(path_or_fileobj=text.encode(), path_in_repo="README.md", repo_id=repo_id)


def test_a_deeply_nested_card_leaves_listings_up_for_everyone(hub_env, monkeypatch):
    api, anonymous = api_for(hub_env, hub_env.write_token), api_for(hub_env, None)
    push_unchecked_readme(api, "alice/limits-deep", DEEP_CARD, monkeypatch)

    for client in (api, anonymous):
        listed = {m.id: m for m in client.list_models(author="alice")}  # 200, or it raises
        assert "alice/limits-deep" in listed and not listed["alice/limits-deep"].card_data
    assert not api.model_info("alice/limits-deep").card_data
    readme = hashlib.sha256(DEEP_CARD.encode()).hexdigest()
    assert any(readme in line and "nests deeper than 32" in line for line in hub_env.log.read_text().splitlines())
    with pytest.raises(ValueError, match="nests deeper than 32 levels"):  # the real client's own check
        api.upload_file(path_or_fileobj=DEEP_CARD.encode(), path_in_repo="README.md", repo_id="alice/limits-deep")


def test_a_card_field_of_the_wrong_type_is_refused_and_a_stored_one_leaves_listings_up(run_cli, hub_env, tmp_path,
                                                                                     monkeypatch):
    """`tags: 7` makes huggingface_hub's parse of a listing raise (its ModelInfo): validate-yaml refuses
    such a card naming the field, as the Hub does; one stored without that check is served without the
    field, and the adapter is still listed, by `loradock list` and by HfApi."""
    from huggingface_hub import hf_hub_download

    api = api_for(hub_env, hub_env.write_token)
    assert run_cli("push", adapter_folder(tmp_path / "a"), "alice/limits-typed").code == 0
    readme = open(hf_hub_download("alice/limits-typed", "README.md", endpoint=hub_env.url,
                                  token=hub_env.write_token)).read()
    _, front, body = readme.split("---\n", 2)
    damaged = f"---\n{yaml.safe_dump({**yaml.safe_load(front), 'tags': 7, 'self': 1})}---\n{body}"
    with pytest.raises(ValueError, match='"tags" must be a string or an array of strings'):
        api.upload_file(path_or_fileobj=damaged.encode(), path_in_repo="README.md", repo_id="alice/limits-typed")
    push_unchecked_readme(api, "alice/limits-typed", damaged, monkeypatch)

    listed = run_cli("list", "--search", "limits-typed")
    assert listed.code == 0 and listed.out.splitlines()[1].split()[:4] == ["alice/limits-typed", "loradock/tiny-chat",
                                                                          "lora", "8"], listed.text
    card = api.model_info("alice/limits-typed").card_data
    assert card.tags is None and card.library_name == "peft" and card.loradock["method"] == "lora"
    assert [m.id for m in api.list_models(search="limits-typed", cardData=True)] == ["alice/limits-typed"]
    assert '"tags" must be a string or an array of strings' in hub_env.log.read_text()


def test_a_card_of_aliases_gives_a_small_answer(hub_env, monkeypatch):
    assert len(LAUGHS_CARD) < 400
    push_unchecked_readme(api_for(hub_env, hub_env.write_token), "alice/limits-laughs", LAUGHS_CARD, monkeypatch)
    info = httpx2.get(f"{hub_env.url}/api/models/alice/limits-laughs", timeout=60)
    listing = httpx2.get(f"{hub_env.url}/api/models", params={"search": "limits-laughs"}, timeout=60)
    assert info.status_code == listing.status_code == 200
    assert len(info.content) < 10_000 and len(listing.content) < 10_000
    assert info.json()["cardData"] is None and listing.json()[0]["cardData"] is None


def test_card_front_matter_is_plain_json_data():
    """What the bounded parser gives back for what it accepts, and its reasons for what it does not."""
    from hub.cards import MAX_FRONT_MATTER, front_matter

    assert front_matter("no front matter") == {} and front_matter("---\n---\nbody") == {}
    assert front_matter("---\r\nd: 2024-01-01\r\nf: [.nan, .inf]\r\n1: x\r\ntrue: y\r\nn: null\r\n<<: {m: 1}\r\n---\r\n") == {
        "d": "2024-01-01", "f": [None, None], "1": "x", "true": "y", "m": 1}
    refused = {
        "---\nx: " + "x" * MAX_FRONT_MATTER + "\n---\n": "over the 65536 byte limit",
        LAUGHS_CARD: "anchors and aliases are not allowed",
        "---\nx: !!python/object:os.system ls\n---\n": "tags are not allowed",
        "---\nx: !!str 1\n---\n": "tags are not allowed",
        DEEP_CARD: "nests deeper than 32 levels",
        "---\n- a\n---\n": "must be a mapping",
        "---\na: [\n---\n": "not valid YAML",
        "---\n? [a]\n: b\n---\n": "keys must be plain values",
        "---\na: " + "9" * 5000 + "\n---\n": "too long to read",
    }
    for text, reason in refused.items():
        with pytest.raises(ValueError, match=reason):
            front_matter(text)


# --- 2. validate-yaml -----------------------------------------------------------------------------

def test_validate_yaml_needs_a_token_and_has_its_own_size_cap(hub_env):
    url, auth = f"{hub_env.url}/api/validate-yaml", {"authorization": f"Bearer {hub_env.write_token}"}
    card = {"content": "---\nlicense: mit\n---\n# card\n", "repoType": "model"}

    anonymous = httpx2.post(url, json=card)
    assert anonymous.status_code == 401 and "token" in anonymous.json()["error"]
    oversized = httpx2.post(url, json={"content": "x" * MiB}, headers=auth)
    assert oversized.status_code == 413 and "byte limit" in oversized.json()["error"]
    assert httpx2.post(url, json=card, headers=auth).json() == {}
    refused = httpx2.post(url, json={"content": LAUGHS_CARD}, headers=auth)
    assert refused.status_code == 400 and "aliases are not allowed" in refused.json()["errors"][0]["message"]
    for body in (b"[" * 100_000, b"[]", b'{"content": 5}', b"\xff"):
        reply = httpx2.post(url, content=body, headers={**auth, "content-type": "application/json"})
        assert reply.status_code == 400 and reply.json()["errors"], (body[:20], reply.text)

    # huggingface_hub checks every README it uploads with this route, with the token: a good card passes.
    api = api_for(hub_env, hub_env.write_token)
    api.create_repo("alice/limits-card", exist_ok=True)
    api.upload_file(path_or_fileobj=card["content"].encode(), path_in_repo="README.md", repo_id="alice/limits-card")
    assert api.model_info("alice/limits-card").card_data.to_dict() == {"license": "mit"}


# --- 3. the body limit ----------------------------------------------------------------------------

def test_a_chunked_body_over_the_cap_is_refused_as_it_arrives(hub_env):
    def body():  # no Content-Length: httpx sends it chunked
        for _ in range(65):
            yield b" " * MiB

    reply = httpx2.post(f"{hub_env.url}/api/repos/create", content=body(), timeout=120,
                        headers={"content-type": "application/json"})
    assert reply.status_code == 413 and "67108864 bytes" in reply.json()["error"]
    with Connection(hub_env) as conn:  # the same, by hand, on a connection that is then used again
        reply = conn.request("POST", "/api/repos/create", body=(b" " * MiB for _ in range(65)), chunked=True)
        assert reply.status == 413 and conn.request("GET", "/health").status == 200
    assert healthy(hub_env)


def test_the_body_limit_counts_the_bytes_that_arrive(tmp_path):
    """In process, under a 1 KiB cap: a chunked body is refused once past it, one under it reaches
    the route whole, and a Content-Length that is not ASCII digits is a 400 (through uvicorn its
    HTTP parser refuses those first: see the next test)."""
    import asyncio

    from hub.server import create_app
    from hub.storage import Registry

    app = create_app(Registry(tmp_path / "root"), max_body=1024)

    async def chunks(*parts: bytes):
        for part in parts:
            yield part

    async def requests():
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://registry") as client:
            over = await client.post("/api/repos/create", content=chunks(*[b" " * 256] * 5))
            under = await client.post("/api/repos/create", content=chunks(b'{"na', b'me": 5}'),
                                      headers={"content-type": "application/json"})
            lengths = [await client.get("/health", headers={"content-length": value}) for value in
                       (b"\xb2", "\u00b2".encode(), "\u0663".encode(), b"1_0", b"-1")]
        return over, under, lengths

    over, under, lengths = asyncio.run(requests())
    assert over.status_code == 413 and "1024 bytes" in over.json()["error"]
    assert under.status_code == 400 and "name" in under.json()["error"]  # parsed by the route
    assert [r.status_code for r in lengths] == [400] * 5 and all("Content-Length" in r.json()["error"] for r in lengths)


def test_a_content_length_of_unicode_digits_is_refused(hub_env):
    for length in ("\u00b2".encode(), "\u0663".encode(), b"1_0", b"+5"):
        with Connection(hub_env) as conn:
            reply = conn.request("POST", "/api/repos/create", {"content-length": length})
            assert reply is not None and reply.status == 400, length  # the HTTP server's own refusal
    assert healthy(hub_env)


# --- 4. and 5. request text in headers, undecodable paths -----------------------------------------

def test_control_characters_in_a_name_give_a_clean_4xx_on_a_kept_connection(hub_env):
    auth = {"authorization": f"Bearer {hub_env.write_token}"}
    with Connection(hub_env) as conn:
        for bad in ("%00", "%0a", "%0d", "%0d%0aSet-Cookie:%20x=1"):
            reply = conn.request("GET", f"/api/models/alice/x{bad}y")
            assert hub_error_problem(reply) is None, (bad, reply)
            assert "set-cookie" not in reply.headers
        for name in ("x\u0000y", "x\ny", "x\r\ny", "x\u00e9\U0001f600"):
            body = json.dumps({"name": name}).encode()
            reply = conn.request("POST", "/api/repos/create", {**auth, "content-type": "application/json"}, body)
            assert hub_error_problem(reply) is None, (name, reply)
        api_for(hub_env, hub_env.write_token).create_repo("alice/limits-names", exist_ok=True)
        for start in ("ma\u0000in", "ma\nin", "ma\r\nX-Injected: 1", "ma\u00e9in\U0001f600"):  # a revision in a body
            body = json.dumps({"startingPoint": start}).encode()
            reply = conn.request("POST", "/api/models/alice/limits-names/branch/b", {**auth, "content-type": "application/json"},
                                 body)
            assert hub_error_problem(reply) is None and "x-injected" not in reply.headers, (start, reply)
            assert start in reply.json()["error"]  # the body keeps the message whole
        assert conn.request("GET", "/health").status == 200


def test_a_final_newline_is_not_dropped_from_a_revision_or_file_path(hub_env, monkeypatch):
    """Route patterns end in `$`, which matches before a final newline: `main%0a` must not read as `main`."""
    push_unchecked_readme(api_for(hub_env, hub_env.write_token), "alice/limits-newline", "# card\n", monkeypatch)
    with Connection(hub_env) as conn:
        for target in ("/api/models/alice/limits-newline/revision/main%0a", "/alice/limits-newline/resolve/main/README.md%0a",
                       "/api/models/alice/limits-newline/tree/main%0a", "/api/models/alice/limits-newline/commits/main%0a"):
            reply = conn.request("GET", target)
            assert hub_error_problem(reply) is None and reply.status == 400, (target, reply)
            assert "control character" in reply.json()["error"]


def test_paths_that_are_not_utf8_are_a_400(hub_env):
    with Connection(hub_env) as conn:
        for bad in ("%ff", "%c0%af", "%ed%a0%80", "%e2%82"):
            reply = conn.request("GET", f"/api/models/alice/x{bad}")
            assert hub_error_problem(reply) is None and reply.status == 400, (bad, reply)
            assert "not UTF-8" in reply.json()["error"]
        assert conn.request("GET", "/health").status == 200


# --- 6. the sweep ---------------------------------------------------------------------------------

@dataclass
class Case:
    """One bad request. `by_server`: the HTTP server itself refuses it (a plain-text 400 and the
    connection closed) before the registry sees it; only the status is checked then."""

    method: str
    target: str
    body: bytes | list[bytes] = b""
    headers: dict = field(default_factory=dict)
    chunked: bool = False
    by_server: bool = False

    def __str__(self) -> str:
        body = self.body if isinstance(self.body, bytes) else b"<chunked %d bytes>" % sum(map(len, self.body))
        shown = body[:300] + (b"... (%d bytes)" % len(body) if len(body) > 300 else b"")
        extra = {k: v for k, v in self.headers.items() if k.lower() != "authorization"}
        return f"{self.method} {self.target} {extra or ''} {shown!r}"


@dataclass
class Failure:
    """A case the registry got wrong: what was wrong, its answer, and what the registry logged meanwhile."""

    case: Case
    problem: str
    status: int | None
    answer: bytes
    traceback: str

    def __str__(self) -> str:
        return (f"{self.case}\n  -> {self.problem} (status {self.status}): {self.answer[:300]!r}"
                + (f"\n  registry log:\n{self.traceback}" if self.traceback else ""))


def sweep(registry, cases: list[Case], token: str | None = None, state=None) -> list[Failure]:
    """Sends each case (with `token`, when given, unless it sets its own Authorization) on a kept
    connection and returns what went wrong, with the registry's log of it: an answer that is not a
    whole 4xx in the Hub's error shape, a connection that drops (each answer is followed by a
    `/health` on the same connection, unless the server said it closes it), and, with `state` (a
    function returning what must not change), a request other than GET or HEAD that changed it."""
    failures, conn, before = [], Connection(registry), state() if state else None
    try:
        for case in cases:
            offset = registry.log.stat().st_size
            headers = dict(case.headers)
            if token and not any(k.lower() == "authorization" for k in headers):
                headers["authorization"] = f"Bearer {token}"
            reply = conn.request(case.method, case.target, headers, case.body, case.chunked)
            problem = answer_problem(case, reply)
            if reply is not None and reply.headers.get("connection") == "close":
                conn.sock.close()
                conn = Connection(registry)
            elif conn.request("GET", "/health") is None:
                problem = problem or "the connection dropped after the answer"
                conn = Connection(registry)
            if state and case.method not in ("GET", "HEAD") and (after := state()) != before:
                problem, before = problem or f"it changed the registry: {changes(before, after)}", after
            if problem:
                time.sleep(0.2)  # the server logs its traceback after the answer
                failures.append(Failure(case, problem, reply and reply.status, reply.body if reply else b"",
                                        logged_since(registry, offset)))
    finally:
        conn.sock.close()
    return failures


def answer_problem(case: Case, reply: Reply | None) -> str | None:
    """What is wrong with the answer to one case, or None (see hub_error_problem)."""
    if case.by_server:
        return None if reply is not None and reply.status == 400 else "not refused with a 400"
    if reply is not None and reply.headers.get("connection") == "close":
        return hub_error_problem(reply, case.method) or "the server closed the connection after answering"
    return hub_error_problem(reply, case.method)


def logged_since(registry, offset: int) -> str:
    """The registry's log from `offset`, where it holds an error (a traceback, an exception)."""
    with registry.log.open("rb") as log:
        log.seek(offset)
        logged = log.read().decode("utf-8", "replace")
    return logged if "Traceback" in logged or "Error" in logged else ""


def changes(before: dict, after: dict) -> str:
    keys = sorted(set(before) | set(after), key=repr)
    return "; ".join(f"{key!r}: {before.get(key, '(none)')!r:.200} -> {after.get(key, '(none)')!r:.200}"
                     for key in keys if before.get(key) != after.get(key))


BAD_SEGMENTS = ["%00", "%0a", "%0d", "%ff", "%c0%af"]
UNICODE_DIGITS = ["%C2%B2", "%D9%A3", "%EF%BC%91"]  # '²', Arabic-Indic 3, fullwidth 1
OID = "ab" * 32
NOT_A_STRING = [5, 1.5, True, [], ["x"], {}, {"a": 1}, 10**30]
NOT_A_SIZE = ["1", "big", 1.5, -1, 10**30, True, [], {}, None]
NOT_A_BOOL = [5, "true", [], {}]
NOT_A_LIST = [5, 1.5, True, "x", {}, {"a": 1}, None, [5], [None], [[]]]


def json_case(method: str, target: str, body) -> Case:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Case(method, target, raw, {"content-type": "application/json"})


def spoiled(valid: dict, spoils: dict[str, list]) -> list:
    """`valid` with one field at a time (a dotted path, `files.0.size`) set to each bad value."""
    out = []
    for path, values in spoils.items():
        for value in values:
            body = json.loads(json.dumps(valid))
            *parents, last = path.split(".")
            target = body
            for key in parents:
                target = target[int(key) if key.isdigit() else key]
            target[int(last) if last.isdigit() else last] = value
            out.append(body)
    return out


def ndjson(*lines) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def sweep_cases(ns: str, name: str) -> list[Case]:
    """Bad input for every route of hub/routes, aimed at the repo `ns/name` (which has a.txt,
    dir/b.txt and a tag v1): nothing here may answer other than a 4xx, or change anything."""
    repo, api = f"{ns}/{name}", f"/api/models/{ns}/{name}"
    header = {"key": "header", "value": {"summary": "sweep"}}
    add = {"key": "file", "value": {"path": "swept.txt", "content": "eA==", "encoding": "base64"}}
    batch = {"operation": "upload", "objects": [{"oid": OID, "size": 1}]}
    preupload = {"files": [{"path": "swept.txt", "size": 1, "sample": ""}]}
    upload = f"/lfs/upload/{OID}?size=1&expires=9999999999&user=alice&sig=x"
    cases = []

    # Control characters and bytes that are not UTF-8 in namespace, name, revision and file path.
    for bad in BAD_SEGMENTS:
        cases += [Case("GET", f"/api/models/{ns}{bad}/{name}"), Case("GET", f"{api}{bad}"),
                  Case("GET", f"{api}/revision/main{bad}"), Case("GET", f"{api}/tree/main{bad}"),
                  Case("GET", f"{api}/tree/main/dir{bad}"), Case("GET", f"/{repo}/resolve/main{bad}/a.txt"),
                  Case("GET", f"/{repo}/resolve/main/a.txt{bad}"), Case("HEAD", f"/{repo}/resolve/main/a.txt{bad}"),
                  Case("GET", f"{api}{bad}/refs"), Case("GET", f"{api}/commits/main{bad}"),
                  json_case("POST", f"{api}/tag/main{bad}", {"tag": "swept"}), Case("DELETE", f"{api}/tag/v1{bad}"),
                  json_case("POST", f"{api}/branch/swept{bad}", {}), Case("DELETE", f"{api}/branch/main{bad}"),
                  json_case("POST", f"{api}/preupload/main{bad}", preupload),
                  Case("POST", f"{api}/paths-info/main{bad}", b"paths=a.txt",
                       {"content-type": "application/x-www-form-urlencoded"}),
                  json_case("POST", f"/{repo}{bad}.git/info/lfs/objects/batch", batch),
                  Case("PUT", f"/lfs/upload/{OID}{bad}?size=1&expires=9999999999&user=alice&sig=x", b"x"),
                  json_case("POST", f"/lfs/verify/{repo}/{OID}{bad}", {"size": 1}),
                  Case("POST", f"{api}/commit/main{bad}", ndjson(header, add)),
                  json_case("PUT", f"{api}{bad}/settings", {"private": False})]
    for path in ("c\u0000.txt", "c\n.txt", "c\r.txt", "dir/\u0000", "../x", "", "x" * 100_000):
        cases += [Case("POST", f"{api}/commit/main", ndjson(header, {"key": "file", "value": {
                      "path": path, "content": "eA==", "encoding": "base64"}})),
                  json_case("POST", f"{api}/preupload/main", {"files": [{"path": path, "size": 1}]})]

    # The same routes under their dataset spelling, and the listings of a namespace's repos.
    for bad in ("%00", "%ff"):
        cases += [Case("GET", f"/api/datasets/{ns}/{name}{bad}"), Case("GET", f"/datasets/{repo}/resolve/main/a{bad}"),
                  json_case("POST", f"/datasets/{repo}{bad}.git/info/lfs/objects/batch", batch),
                  Case("GET", f"/api/organizations/{ns}{bad}/settings/repositories")]
    cases += [json_case("POST", f"/datasets/{repo}.git/info/lfs/objects/batch", {"operation": 5}),
              json_case("POST", f"/lfs/verify/datasets/{repo}/{OID}", {"size": "1"})]

    # Numbers spelled in other digits, and other bad numbers, in the query.
    for digits in UNICODE_DIGITS + ["-1", "1e3", "%00", "%ff", "0x10"]:
        cases += [Case("GET", f"/api/settings/repositories?limit={digits}"),
                  Case("GET", f"/api/models?cursor={digits}"), Case("GET", f"/api/models?limit={digits}"),
                  Case("GET", f"/api/datasets?limit={digits}"), Case("GET", f"{api}/tree/main?cursor={digits}"),
                  Case("GET", f"{api}/commits/main?limit={digits}"),
                  Case("PUT", f"/lfs/upload/{OID}?size={digits}&expires=9999999999&user=alice&sig=x", b"x"),
                  Case("PUT", f"/lfs/upload/{OID}?size=1&expires={digits}&user=alice&sig=x", b"x")]
    cases += [Case("PUT", f"/lfs/upload/{OID}?size={10**30}&expires=9999999999&user=alice&sig=x", b"x"),
              Case("PUT", f"/lfs/upload/{OID}?size=1&expires={10**30}&user=alice&sig=x", b"x"),
              Case("PUT", f"/lfs/upload/{OID}?size=1&expires=9999999999&user=%00&sig=%0a", b"x"),
              Case("PUT", upload, b"x")]  # a signature that does not match

    # Content-Length that is not ASCII digits: the HTTP server refuses it before the registry.
    for length in ("\u00b2", "\u0663", "\uff11", "1_0", "+1", "-1", "0x10"):
        cases.append(Case("POST", "/api/repos/create", b"", {"content-length": length.encode()}, by_server=True))

    # Wrong types, nulls, lists and huge values for every field of every JSON body.
    long = "x" * 1_000_000
    bodies = {
        ("POST", "/api/repos/create"): ({"name": "swept-new"}, {
            "name": NOT_A_STRING + [None, long, "a\u0000b", "a\nb", "swept-new\n", "../x", "a/b", ""],
            "organization": NOT_A_STRING + [long, "alice\u0000", "alice\n", "../x"],
            "visibility": [5, "secret", [], {}], "private": NOT_A_BOOL, "type": NOT_A_STRING + ["space\n"]}),
        ("DELETE", "/api/repos/delete"): ({"name": name}, {
            "name": NOT_A_STRING + [None, f"{name}\u0000", f"{name}\n", long],
            "organization": NOT_A_STRING + [f"{ns}\n", long], "type": NOT_A_STRING}),
        ("POST", "/api/repos/move"): ({"fromRepo": repo, "toRepo": f"{repo}-moved"}, {
            "fromRepo": NOT_A_STRING + [None, f"{repo}\u0000", long], "toRepo": NOT_A_STRING + [None, f"{repo}\n", long],
            "type": NOT_A_STRING}),
        ("PUT", f"{api}/settings"): ({"private": False}, {
            "private": NOT_A_BOOL, "visibility": [5, "secret", [], {}], "gated": [5, "yes", [], {}, True]}),
        ("POST", f"{api}/tag/main"): ({"tag": "swept"}, {
            "tag": NOT_A_STRING + [None, long, "v\u00001", "v\n1", "swept\n", ""], "message": NOT_A_STRING}),
        ("POST", f"{api}/branch/swept"): ({"startingPoint": "main"}, {
            "startingPoint": NOT_A_STRING + ["main\u0000", "main\n", long], "emptyBranch": NOT_A_BOOL}),
        ("POST", f"{api}/super-squash/main"): ({"message": "swept"}, {"message": NOT_A_STRING + [None]}),
        ("POST", f"{api}/preupload/main"): (preupload, {
            "files": NOT_A_LIST, "files.0.path": NOT_A_STRING + [None],
            "files.0.size": NOT_A_SIZE, "files.0.sample": NOT_A_STRING, "gitIgnore": NOT_A_STRING}),
        ("POST", f"/{repo}.git/info/lfs/objects/batch"): (batch, {
            "operation": NOT_A_STRING + [None, "download"], "objects": NOT_A_LIST,
            "objects.0.oid": NOT_A_STRING + [None, "zz", OID + "ab", OID + "\n"], "objects.0.size": NOT_A_SIZE,
            "transfers": [5, "basic", [5], {}], "hash_algo": [5, [], {}], "ref": [5, "main", []]}),
        ("POST", f"/lfs/verify/{repo}/{OID}"): ({"size": 1}, {"size": NOT_A_SIZE}),
        ("POST", "/api/validate-yaml"): ({"content": "---\na: 1\n---\n"}, {"content": NOT_A_STRING + [None]}),
    }
    for (method, target), (valid, spoils) in bodies.items():
        cases += [json_case(method, target, body) for body in spoiled(valid, spoils)]
        cases += [json_case(method, target, raw) for raw in (
            b"[" * 100_000, b'{"a": ' * 100_000, b"[]", b"5", b'"x"', b"null", b"{not json", b'{"name": "\xff"}')]
        cases.append(Case(method, target, b"", {"content-type": "application/json"}))

    # The NDJSON commit: bad lines, headers and operations of every kind.
    lines = [5, [], "x", None, {}, {"key": 5, "value": {}}, {"key": ["file"], "value": {}}, {"key": "file"},
             {"key": "file", "value": []}, {"key": "header", "value": ["summary"]}, {"key": "header", "value": "x"},
             {"key": "copy", "value": {"path": "a.txt"}}, b"[" * 100_000, b'{"key": "header", "value": ' * 50_000,
             b"\xff\xfe", b"{not json"]
    cases += [Case("POST", f"{api}/commit/main", ndjson(header, line)) for line in lines]
    cases += [Case("POST", f"{api}/commit/main", ndjson(line, add)) for line in lines[:12]]
    for body in spoiled(header, {"value.summary": NOT_A_STRING, "value.description": NOT_A_STRING,
                                 "value.parentCommit": NOT_A_STRING + [long, "0" * 40]}):
        cases.append(Case("POST", f"{api}/commit/main", ndjson(body, add)))
    operations = {
        "file": ({"path": "swept.txt", "content": "eA==", "encoding": "base64"},
                 {"path": NOT_A_STRING + [None], "content": NOT_A_STRING + [None, "not base64!", "eA"],
                  "encoding": NOT_A_STRING + ["utf-8"]}),
        "lfsFile": ({"path": "swept.bin", "algo": "sha256", "oid": OID, "size": 1},
                    {"path": NOT_A_STRING + [None], "oid": NOT_A_STRING + [None, "short", OID + "ab", OID + "\n"],
                     "size": NOT_A_SIZE}),
        "deletedFile": ({"path": "a.txt"}, {"path": NOT_A_STRING + [None, "a.txt\u0000", "a.txt\n"]}),
        "deletedFolder": ({"path": "dir"}, {"path": NOT_A_STRING + [None, "dir\u0000"]}),
    }
    for key, (valid, spoils) in operations.items():
        for value in spoiled(valid, spoils):
            if key.startswith("deleted"):
                cases.append(Case("POST", f"{api}/commit/main", ndjson(header, {"key": key, "value": value})))
            else:  # and alone: a valid file beside it must not land either
                cases.append(Case("POST", f"{api}/commit/main", ndjson(header, add, {"key": key, "value": value})))

    # Credentials a client would not send, and bodies over the cap (one chunked, one announced).
    cases += [Case("GET", "/api/whoami-v2", headers={"authorization": b"Bearer \xe9\xff"}),
              Case("GET", "/api/whoami-v2", headers={"authorization": "Bearer " + "x" * 10_000}),
              Case("GET", "/api/whoami-v2", headers={"authorization": "Basic x"}),
              Case("GET", "/api/whoami-v2", headers={"authorization": "Bearer"}),
              Case("GET", "/api/whoami-v2", headers={"authorization": b"Bearer \x01x"}, by_server=True),
              Case("POST", "/api/repos/create", [b" " * MiB] * 65, {"content-type": "application/json"}, chunked=True),
              Case("POST", f"{api}/commit/main", [ndjson(header, add)] + [b"\n" * MiB] * 65, chunked=True),
              Case("POST", f"{api}/commit/main", b"\n" * (65 * MiB))]  # refused on its Content-Length
    # Last, what would take the target away if it got through: later cases still find it.
    return sorted(cases, key=lambda case: case.target in ("/api/repos/move", "/api/repos/delete",
                                                          f"{api}/super-squash/main"))


@pytest.fixture
def sweep_target(hub_env):
    """alice/limits-sweep with a.txt, dir/b.txt and the tag v1; returns (repo id, what it looks like)."""
    from huggingface_hub import CommitOperationAdd

    api = api_for(hub_env, hub_env.write_token)
    repo_id = "alice/limits-sweep"
    if not api.repo_exists(repo_id):
        api.create_repo(repo_id)
        api.create_commit(repo_id, [CommitOperationAdd("a.txt", b"a"), CommitOperationAdd("dir/b.txt", b"b")],
                          commit_message="sweep target")
        api.create_tag(repo_id, tag="v1")
    return repo_id, registry_state(hub_env)


def registry_state(registry, repo_id: str | None = None, client: httpx2.Client | None = None) -> dict:
    """What a sweep must not change: the repos alice sees, and for each (or only `repo_id`) its head,
    privacy, refs, files and history (read over plain HTTP: a repo id the sweep got in may be one
    the client refuses). A `client` kept between calls makes each a few milliseconds."""
    auth = {"authorization": f"Bearer {registry.write_token}"}

    def get(path: str):
        return (client or httpx2).get(f"{registry.url}{path}", headers=auth, timeout=60).json()
    listed = get("/api/models?author=alice")
    state = {"repos": sorted(model["id"] for model in listed)}
    for model in listed:
        if repo_id in (None, model["id"]):
            api = "/api/models/" + "/".join(quote(part, safe="") for part in model["id"].split("/", 1))
            state[model["id"]] = (model["sha"], model["private"], get(f"{api}/refs"),
                                  get(f"{api}/tree/main?recursive=true"), get(f"{api}/commits/main"))
    return state


def test_the_sweep_of_bad_input_at_every_route(hub_env, sweep_target):
    repo_id, before = sweep_target
    cases = sweep_cases(*repo_id.split("/"))
    with httpx2.Client() as client:
        def target() -> dict:
            return registry_state(hub_env, repo_id, client)
        failures = sweep(hub_env, cases, hub_env.write_token, state=target)
        failures += sweep(hub_env, [c for c in cases if c.method != "GET"][:200], state=target)  # and anonymous
    assert healthy(hub_env)
    after = registry_state(hub_env)
    assert not failures and after == before, (
        f"{len(failures)} of {len(cases) + 200} bad requests were not answered with a clean 4xx, or changed the "
        f"registry:\n\n" + "\n\n".join(map(str, failures)) + f"\n\nchanged in all: {changes(before, after)}")


# --- 7. slow clients --------------------------------------------------------------------------------

def drip(port: int, data: bytes, every: float = 1.0, meanwhile=lambda: None) -> tuple[float, bytes | None]:
    """Send `data` to the registry one byte per `every` seconds, calling `meanwhile()` between bytes,
    until it answers or closes: (seconds until then, what it sent, b"" for a close without an answer).
    None: it took every byte without answering."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        started = time.monotonic()
        for byte in data:
            try:
                sock.sendall(bytes([byte]))
                if select.select([sock], [], [], every)[0]:
                    return time.monotonic() - started, sock.recv(1 << 16)
            except OSError:  # reset: closed while we were still sending
                return time.monotonic() - started, b""
            meanwhile()
    return time.monotonic() - started, None


def test_headers_sent_a_byte_a_second_are_cut_off_while_other_clients_are_served(hub_env):
    """The registry's default bound: a request's headers within 10 s; at a byte a second this one
    would take over a minute."""
    request = b"GET /api/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 64 + b"\r\n\r\n"
    others = []

    def another_client() -> None:
        started = time.monotonic()
        others.append((httpx2.get(f"{hub_env.url}/api/models", params={"limit": 1}, timeout=10).status_code,
                       time.monotonic() - started))

    seconds, answer = drip(hub_env.port, request, meanwhile=another_client)
    assert answer is not None, "the registry took the whole request, a byte a second"
    assert 9 < seconds < 14, f"the connection was cut after {seconds:.1f} s"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    if answer:
        assert b"x-error-message: the request's headers took more than 10 s" in answer
    assert len(others) >= 8 and all(status == 200 and took < 2 for status, took in others), others
    assert healthy(hub_env)


def upload_url(registry, token: str, repo_id: str, data: bytes) -> str:
    """The path and query of the LFS upload URL the batch API gives for `data`."""
    oid = hashlib.sha256(data).hexdigest()
    batch = httpx2.post(f"{registry.url}/{repo_id}.git/info/lfs/objects/batch", timeout=30,
                        headers={"authorization": f"Bearer {token}", "content-type": "application/vnd.git-lfs+json"},
                        json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]})
    href = batch.json()["objects"][0]["actions"]["upload"]["href"]
    return href.removeprefix(registry.url)


def test_a_body_that_pauses_is_cut_off_and_one_that_moves_is_not(tmp_path):
    """With --body-idle-timeout 2: an LFS upload that stops half-way is answered 408 within the
    bound and leaves nothing in tmp/; so is a commit whose body stops; an upload that takes 4 s
    in all but never pauses 2 s lands."""
    from hub.client import hub_api
    from loradock.procs import create_token, free_port, start_registry

    root, port = tmp_path / "root", free_port()
    token = create_token(root, "alice")
    server = SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port)
    with start_registry(root, port, tmp_path / "server.log", "--body-idle-timeout", 2):
        hub_api(server.url, token).create_repo("alice/gaps")
        data = os.urandom(2 * MiB)
        with Connection(server) as conn:
            conn.sock.sendall(f"PUT {upload_url(server, token, 'alice/gaps', data)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              f"Content-Length: {len(data)}\r\n\r\n".encode() + data[:MiB])
            started = time.monotonic()
            reply = conn.read_reply("PUT")
            assert reply.status == 408 and "body paused for more than 2 s" in reply.json()["error"]
            assert 1.5 < time.monotonic() - started < 6
        deadline = time.monotonic() + 10
        while list((root / "tmp").iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not list((root / "tmp").iterdir()) and not list((root / "blobs").rglob(hashlib.sha256(data).hexdigest()))

        with Connection(server) as conn:
            conn.sock.sendall(b"POST /api/models/alice/gaps/commit/main HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: 1000\r\n\r\n{")
            reply = conn.read_reply("POST")
            assert reply.status == 408 and hub_error_problem(reply, "POST") is None

        with Connection(server) as conn:
            conn.sock.sendall(f"PUT {upload_url(server, token, 'alice/gaps', data)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              f"Content-Length: {len(data)}\r\n\r\n".encode())
            for piece in range(8):  # 8 pieces 0.5 s apart: 4 s in all
                conn.sock.sendall(data[piece * len(data) // 8:(piece + 1) * len(data) // 8])
                time.sleep(0.5)
            assert conn.read_reply("PUT").status == 200
        assert (root / "blobs" / hashlib.sha256(data).hexdigest()[:2] / hashlib.sha256(data).hexdigest()).exists()


# --- 8. a full disk ---------------------------------------------------------------------------------

def fill(path: Path) -> None:
    """Write zeros to `path` until its disk has no byte left."""
    with path.open("wb", buffering=0) as f:
        for size in (1 << 16, 4096, 512):
            with contextlib.suppress(OSError):
                while f.write(b"\0" * size):
                    pass


class CountingProxy:
    """A TCP proxy on 127.0.0.1 in front of the registry on `port`: what clients send through it
    reaches the registry unchanged, and is counted (bytes, and LFS uploads begun)."""

    UPLOAD = b"PUT /lfs/upload/"

    def __init__(self, port: int):
        self.upstream, self.sent, self.uploads = port, 0, 0
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self.accept, daemon=True).start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.server.close()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self.pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self.pump, args=(upstream, client, False), daemon=True).start()

    def pump(self, source: socket.socket, target: socket.socket, counted: bool) -> None:
        tail = b""  # an upload's request line may be split between two reads
        try:
            while data := source.recv(1 << 16):
                if counted:
                    with self.lock:
                        self.sent += len(data)
                        self.uploads += (tail + data).count(self.UPLOAD)
                    tail = data[-(len(self.UPLOAD) - 1):]
                target.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)


def test_a_push_onto_a_full_registry_disk_is_a_507_sent_once(tmp_path, small_disks):
    """The registry on an 8 MiB disk; a 10.5 MB adapter pushed through `loradock push`: the upload
    is answered 507 in the Hub's shape, huggingface_hub does not send it again, the command prints
    the problem and the fix (no traceback), and the registry keeps nothing of it. Then, with its
    disk filled to the last byte, a commit is a 507 too; once space is freed, a push succeeds."""
    from hub.client import Registry, hub_api
    from loradock.procs import Service, create_token, free_port, loradock_command
    from tests.conftest import on_a_small_disk, run_loradock

    seed, disk, port = tmp_path / "seed", tmp_path / "disk", free_port()
    token = create_token(seed, "alice")
    disk.mkdir()
    serve = loradock_command("hub", "serve", "--root", disk, "--port", port, "--max-file-size", 64 * MiB)
    with Service("the registry", on_a_small_disk(disk, "8m", serve, seed=seed), tmp_path / "server.log") as server:
        server.wait_healthy(f"http://127.0.0.1:{port}/health", 60)
        on_disk = Path(f"/proc/{server.process.pid}/root") / disk.relative_to("/")  # its tmpfs, seen from here
        weights = os.urandom(10_500_000)
        with CountingProxy(port) as proxy:
            pushed = run_loradock("push", adapter_folder(tmp_path / "big", weights=weights), "alice/full",
                                  "--registry", proxy.url, "--token", token, timeout=300)
        assert pushed.returncode == 2, pushed.stdout + pushed.stderr
        assert "Traceback" not in pushed.stderr
        assert f"error: the registry at {proxy.url} is out of disk space: nothing was pushed" in pushed.stderr
        assert "free space on its disk (`loradock hub gc`" in pushed.stderr
        assert "refused with 507: [Errno 28] No space left on device" in (tmp_path / "server.log").read_text()
        assert proxy.uploads == 1 and proxy.sent < 1.2 * len(weights), (proxy.uploads, proxy.sent)
        assert not list((on_disk / "tmp").iterdir())
        api = hub_api(f"http://127.0.0.1:{port}", token)
        assert [s.rfilename for s in api.model_info("alice/full").siblings] == [".gitattributes"]

        fill(on_disk / "filler")
        with Connection(SimpleNamespace(port=port)) as conn:
            line = {"key": "file", "value": {"path": "a.txt", "content": "eA==", "encoding": "base64"}}
            reply = conn.request("POST", "/api/models/alice/full/commit/main", body=ndjson(
                {"key": "header", "value": {"summary": "x"}}, line), headers={"authorization": f"Bearer {token}"})
        assert reply is not None and reply.status == 507, reply
        assert reply.headers["x-error-code"] == "InsufficientStorage"
        assert "the registry's disk is full" in reply.json()["error"] and "loradock hub gc" in reply.json()["error"]
        assert not list((on_disk / "tmp").iterdir())

        (on_disk / "filler").unlink()
        result = Registry(f"http://127.0.0.1:{port}", token).push(str(adapter_folder(tmp_path / "small")), "alice/full")
        after = api.model_info("alice/full", revision=result.commit)
        assert "adapter_model.safetensors" in {s.rfilename for s in after.siblings}
