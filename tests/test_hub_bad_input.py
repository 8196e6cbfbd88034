"""Bad input to push, pull and the server: a clear error, nothing written, never a 5xx; and a
server killed mid-upload comes back at its last commit."""

import hashlib
import json
import os
import socket
import threading
import time

import httpx2
import pytest

from tests.conftest import RegistryProcess, adapter_folder


def repo_exists(registry, repo_id: str) -> bool:
    from hub.client import hub_api

    return hub_api(registry.url, registry.write_token).repo_exists(repo_id)


# --- push -----------------------------------------------------------------------------------------

def _not_peft(folder):
    (folder / "adapter_config.json").unlink()


def _pickle_weights(folder):
    (folder / "adapter_model.bin").write_bytes(b"pickle")


def _no_base(folder):
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))


def _escaping_link(folder):
    (folder / "notes.txt").symlink_to("/etc/hostname")


def _listed_metrics(folder):
    (folder / "metrics.json").write_text('{"eval_loss": 0.5, "eval_metrics": [1, 2]}')


def _text_loss(folder):
    (folder / "metrics.json").write_text('{"eval_loss": "x"}')


def _typed_run_config(folder):
    (folder / "run_config.yaml").write_text("data: 7\ntraining: [1]\n")


def _numbered_target_module(folder):
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj", 7]}))


@pytest.mark.parametrize("spoil,message", [
    (_not_peft, "is not a PEFT adapter folder: there is no adapter_config.json"),
    (_pickle_weights, "adapter_model.bin is a pickle-based weights file"),
    (_no_base, "does not record its base model"),
    (_escaping_link, "notes.txt in"),
    (_listed_metrics, "metrics.json: eval_metrics is [1, 2], not a mapping of metric names to numbers"),
    (_text_loss, 'metrics.json: eval_loss is "x", not a finite number'),
    (_typed_run_config, "run_config.yaml: data is 7, not text; run_config.yaml: training is [1], not a mapping"),
    (_numbered_target_module, 'adapter_config.json: target_modules is ["q_proj", 7], not text or a list of texts'),
], ids=["not-peft", "pickle", "no-base-model", "escaping-link", "metrics-list", "metrics-text-loss",
        "run-config-types", "config-target-module-types"])
def test_push_refuses_a_bad_folder(run_cli, hub_env, tmp_path, spoil, message):
    folder = adapter_folder(tmp_path / "a")
    spoil(folder)
    result = run_cli("push", folder, "alice/refused")
    assert result.code == 2 and message in result.err and "fix:" in result.err
    assert not repo_exists(hub_env, "alice/refused")


def test_push_refuses_a_file_over_the_size_limit(run_cli, hub_env, tmp_path):
    result = run_cli("push", adapter_folder(tmp_path / "a"), "alice/big", "--max-file-size", "100")
    assert result.code == 2 and "over the 100 byte limit" in result.err and not repo_exists(hub_env, "alice/big")


@pytest.mark.parametrize("repo_id", ["noslash", "a/b/c", "bad id/x", "../etc", "alice/x--y"])
def test_push_refuses_an_invalid_repo_id(run_cli, hub_env, tmp_path, repo_id):
    result = run_cli("push", adapter_folder(tmp_path / "a"), repo_id)
    assert result.code == 2 and f"invalid repo id {repo_id!r}" in result.err


# --- pull -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,message", [
    ("alice/does-not-exist", "repo alice/does-not-exist not found at"),
    ("alice/pullable@no-such-tag", "alice/pullable has no revision 'no-such-tag'"),
    ("alice/pullable@abc1234", "'abc1234' looks like a short or malformed commit sha"),
    ("alice/pullable@" + "a" * 41, "looks like a short or malformed commit sha"),
    ("alice/pullable@v1;rm", "'v1;rm' is not a valid revision"),
    ("alice/pullable@" + "0" * 40, "alice/pullable has no revision '" + "0" * 40),
])
def test_pull_names_what_is_missing(run_cli, hub_env, tmp_path, spec, message):
    if not repo_exists(hub_env, "alice/pullable"):
        assert run_cli("push", adapter_folder(tmp_path / "a"), "alice/pullable").code == 0
    result = run_cli("pull", spec, "--to", tmp_path / "out")
    assert result.code == 2 and message in result.err, result.err
    assert not (tmp_path / "out").exists()


def test_pull_detects_a_corrupt_blob_and_keeps_nothing(run_cli, hub_env, tmp_path):
    weights = os.urandom(1 << 20)
    assert run_cli("push", adapter_folder(tmp_path / "a", weights), "alice/corrupted").code == 0
    blob = hub_env.root / "blobs" / hashlib.sha256(weights).hexdigest()[:2] / hashlib.sha256(weights).hexdigest()
    blob.write_bytes(bytes([weights[0] ^ 1]) + weights[1:])  # same size, one bit flipped
    out = tmp_path / "out"
    result = run_cli("pull", "alice/corrupted", "--to", out)
    assert result.code == 2 and "adapter_model.safetensors is corrupt" in result.err and "nothing was kept" in result.err
    assert not out.exists() and not list(tmp_path.glob(".out.pulling-*"))


# --- the server -----------------------------------------------------------------------------------

def raw_request(registry, head: str) -> tuple[int, bytes]:
    """A hand-written HTTP request, for what a well-behaved client would not send."""
    with socket.create_connection(("127.0.0.1", registry.port)) as s:
        s.sendall(head.encode())
        reply = s.recv(65536)
    return int(reply.split()[1]), reply


def test_server_answers_bad_requests_with_4xx_in_the_hub_shape(run_cli, hub_env, tmp_path):
    run_cli("push", adapter_folder(tmp_path / "a"), "alice/target")
    auth = {"authorization": f"Bearer {hub_env.write_token}"}
    url = hub_env.url
    cases = [
        ("POST", "/api/repos/create", {"content": b"{not json", "headers": {**auth, "content-type": "application/json"}}, 400),
        ("POST", "/api/repos/create", {"json": {"name": 5}, "headers": auth}, 400),
        ("POST", "/api/repos/create", {"json": {"name": "../../etc"}, "headers": auth}, 400),
        ("GET", "/api/models/alice/target", {"headers": {"authorization": "Bearer hf_unknown"}}, 401),
        ("GET", "/api/models/alice/target", {"headers": {"authorization": "Basic abc"}}, 401),
        ("GET", "/alice/target/resolve/main/..%2F..%2Fregistry.sqlite", {}, 404),
        ("GET", "/alice/target/resolve/main/../../registry.sqlite", {}, 404),
        ("GET", "/api/models/alice/target/tree/main/..%2F..", {}, 404),
        ("GET", "/api/models/alice/target/revision/..%2F..%2Fetc", {}, 404),
        ("PUT", "/lfs/upload/..%2F..%2Fevil?size=1&expires=9999999999&sig=x", {"content": b"x"}, 403),
        ("POST", "/alice/target.git/info/lfs/objects/batch",
         {"json": {"operation": "upload", "objects": [{"oid": "../../evil", "size": 1}]}, "headers": auth}, 400),
        ("POST", "/alice/target.git/info/lfs/objects/batch",
         {"json": {"operation": "upload", "objects": [{"oid": "ab" * 32, "size": -1}]}, "headers": auth}, 400),
        ("POST", "/api/models/alice/target/commit/main",
         {"content": b'{"key": "header", "value": {"summary": "x"}}\n{"key": "file", "value": {"path": "../evil.txt", '
                     b'"content": "eA==", "encoding": "base64"}}\n', "headers": auth}, 400),
        ("POST", "/api/models/alice/target/commit/main", {"content": b"not ndjson", "headers": auth}, 400),
        ("POST", "/api/models/alice/target/commit/main",
         {"content": b'{"key": "header", "value": {"summary": "x"}}\n{"key": "lfsFile", "value": {"path": "w.bin", '
                     b'"algo": "sha256", "oid": "' + b"cd" * 32 + b'", "size": 10}}\n', "headers": auth}, 400),
        ("POST", "/api/models/alice/target/commit/main", {"content": b'{"key": "header", "value": {"summary": "x"}}\n'}, 401),
        ("POST", "/api/models/alice/target/commit/main",
         {"content": b'{"key": "header", "value": {"summary": "x", "parentCommit": "' + b"0" * 40 + b'"}}\n', "headers": auth}, 412),
        ("DELETE", "/api/models/alice/target/tag/never-made", {"headers": auth}, 404),
        ("GET", "/api/models?cursor=abc", {}, 400),
        ("POST", "/lfs/verify/alice/target/" + "ab" * 32, {"json": {"size": "big"}, "headers": auth}, 400),
    ]
    head_before = httpx2.get(f"{url}/api/models/alice/target").json()["sha"]
    for method, path, kwargs, status in cases:
        response = httpx2.request(method, url + path, **kwargs)
        assert response.status_code == status, (method, path, response.status_code, response.text)
        assert "error" in response.json(), (path, response.text)
        assert hub_env.write_token not in response.text
    assert httpx2.get(f"{url}/api/models/alice/target").json()["sha"] == head_before  # nothing committed
    assert not (hub_env.root.parent / "evil.txt").exists() and not (hub_env.root / "evil.txt").exists()
    status, _ = raw_request(hub_env, f"POST /api/repos/create HTTP/1.1\r\nHost: x\r\nContent-Length: {10**12}\r\n\r\n")
    assert status == 413


def test_an_upload_that_does_not_match_its_sha256_is_not_kept(hub_env):
    from hub.client import hub_api

    hub_api(hub_env.url, hub_env.write_token).create_repo("alice/uploads", exist_ok=True)
    data, wrong = os.urandom(5000), "ef" * 32
    batch = httpx2.post(f"{hub_env.url}/alice/uploads.git/info/lfs/objects/batch",
                        headers={"authorization": f"Bearer {hub_env.write_token}"},
                        json={"operation": "upload", "objects": [{"oid": wrong, "size": len(data)}]}).json()
    put = httpx2.put(batch["objects"][0]["actions"]["upload"]["href"], content=data)
    assert put.status_code == 400 and "does not match" in put.json()["error"]
    assert not (hub_env.root / "blobs" / wrong[:2] / wrong).exists() and not list((hub_env.root / "tmp").iterdir())


def test_killed_mid_upload_the_registry_restarts_at_its_last_commit(tmp_path):
    from huggingface_hub import CommitOperationAdd

    from hub.client import hub_api

    server = RegistryProcess(tmp_path / "root", tmp_path / "server.log")
    server.root.mkdir()
    server.start()
    token = server.token()
    api = hub_api(server.url, token)
    api.create_repo("alice/durable")
    head = api.create_commit("alice/durable", [CommitOperationAdd("a.txt", b"first")], commit_message="first").oid

    # One object fully uploaded but never committed, one cut off by the kill.
    done, partial = os.urandom(2 << 20), os.urandom(40 << 20)
    objects = [{"oid": hashlib.sha256(d).hexdigest(), "size": len(d)} for d in (done, partial)]
    batch = httpx2.post(f"{server.url}/alice/durable.git/info/lfs/objects/batch",
                        headers={"authorization": f"Bearer {token}"},
                        json={"operation": "upload", "objects": objects}).json()["objects"]
    assert httpx2.put(batch[0]["actions"]["upload"]["href"], content=done).status_code == 200
    sent = threading.Event()

    def slow_body():
        for start in range(0, len(partial), 1 << 20):
            yield partial[start:start + (1 << 20)]
            if start >= 4 << 20:
                sent.set()
                time.sleep(0.2)

    uploader = threading.Thread(target=lambda: _ignore_errors(
        lambda: httpx2.put(batch[1]["actions"]["upload"]["href"], content=slow_body(),
                           headers={"content-length": str(len(partial))}, timeout=60)))
    uploader.start()
    assert sent.wait(30)
    server.stop(kill=True)
    uploader.join()

    server.start()
    try:
        assert api.model_info("alice/durable").sha == head
        assert sorted(api.list_repo_files("alice/durable")) == [".gitattributes", "a.txt"]
        assert [c.commit_id for c in api.list_repo_commits("alice/durable")][0] == head
        assert not list((server.root / "tmp").iterdir())
        assert not (server.root / "blobs" / objects[1]["oid"][:2] / objects[1]["oid"]).exists()
        with open(api.hf_hub_download("alice/durable", "a.txt", revision=head, cache_dir=tmp_path / "c"), "rb") as f:
            assert f.read() == b"first"
    finally:
        server.stop()


def _ignore_errors(call):
    try:
        call()
    except httpx2.HTTPError:
        pass  # the server was killed under it
