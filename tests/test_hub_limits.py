"""Every parser of the registry is bounded: a README's front matter, validate-yaml, request bodies,
paths and the error header.

    flock /tmp/loradock-heavy.lock .venv/bin/python -m pytest -q tests/test_hub_limits.py

Requests a well-behaved client would not send go through `Connection`, a raw socket.
"""

import hashlib
import json
import socket
from dataclasses import dataclass
from typing import Self

import httpx2
import pytest

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
