"""The blob store's housekeeping against a running `loradock hub serve`, through huggingface_hub:
uploads in flight survive other `hub` commands and a second server on the same root."""

import hashlib
import os
import threading
import time

import httpx2
import pytest
from huggingface_hub import CommitOperationAdd

from hub.blobs import BlobStore
from hub.client import hub_api
from loradock.procs import create_token
from tests.conftest import RegistryProcess

HOURS_AGO = time.time() - 3 * 3600  # older than gc's default grace period


@pytest.fixture
def server(tmp_path):
    """A registry of its own (gc sees every blob of it), with a write token for alice."""
    server = RegistryProcess(tmp_path / "root", tmp_path / "server.log")
    server.root.mkdir()
    server.start()
    server.write_token = server.token("alice")
    server.api = hub_api(server.url, server.write_token)
    yield server
    server.stop()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_downloads(server, repo_id: str, files: dict[str, bytes], cache) -> None:
    for path, data in files.items():
        with open(server.api.hf_hub_download(repo_id, path, cache_dir=cache), "rb") as f:
            assert f.read() == data, f"{repo_id}/{path}"


def upload_url(server, repo_id: str, data: bytes) -> str:
    """The signed PUT URL the LFS batch API gives for `data` (driven by hand, as the client would)."""
    batch = httpx2.post(f"{server.url}/{repo_id}.git/info/lfs/objects/batch",
                        headers={"authorization": f"Bearer {server.write_token}"},
                        json={"operation": "upload", "objects": [{"oid": sha(data), "size": len(data)}]})
    return batch.json()["objects"][0]["actions"]["upload"]["href"]


class SlowPut(threading.Thread):
    """An LFS PUT that sends 2 MiB, then waits for `resume` before sending the rest; `status` at the end."""

    def __init__(self, url: str, data: bytes):
        super().__init__()
        self.url, self.data, self.status = url, data, None
        self.paused, self.resume = threading.Event(), threading.Event()

    def body(self):
        for start in range(0, len(self.data), 1 << 20):
            if start == 2 << 20:
                self.paused.set()
                assert self.resume.wait(120)
            yield self.data[start:start + (1 << 20)]

    def run(self):
        self.status = httpx2.put(self.url, content=self.body(), headers={"content-length": str(len(self.data))},
                                 timeout=120).status_code

    def start_and_pause(self, root) -> "SlowPut":
        """Start it; return once the server is receiving it into `tmp/`."""
        self.start()
        assert self.paused.wait(30)
        deadline = time.monotonic() + 30
        while not any(p.stat().st_size for p in (root / "tmp").iterdir()):
            assert time.monotonic() < deadline, "the upload never reached tmp/"
            time.sleep(0.05)
        return self

    def finish(self) -> int:
        self.resume.set()
        self.join(60)
        return self.status


def test_an_upload_in_flight_survives_token_create(server, tmp_path):
    server.api.create_repo("alice/inflight")
    data = os.urandom(6 << 20)
    upload = SlowPut(upload_url(server, "alice/inflight", data), data).start_and_pause(server.root)

    create_token(server.root, "bob")  # `loradock hub token create --root ROOT` opens the registry
    assert upload.finish() == 200
    server.api.create_commit("alice/inflight", [CommitOperationAdd("weights.bin", data)], commit_message="weights")
    assert_downloads(server, "alice/inflight", {"weights.bin": data}, tmp_path / "cache")


def test_a_second_server_on_the_root_leaves_tmp_alone_and_says_so(server, tmp_path):
    server.api.create_repo("alice/shared")
    data = os.urandom(6 << 20)
    upload = SlowPut(upload_url(server, "alice/shared", data), data).start_and_pause(server.root)

    second = RegistryProcess(server.root, tmp_path / "second.log").start()
    second.stop()
    assert upload.finish() == 200
    assert f"another `loradock hub serve` is using {server.root}" in second.log.read_text()
    server.api.create_commit("alice/shared", [CommitOperationAdd("weights.bin", data)], commit_message="weights")
    assert_downloads(server, "alice/shared", {"weights.bin": data}, tmp_path / "cache")

    server.stop(kill=True)  # the last server gone, the next one cleans what a killed one left
    (server.root / "tmp" / "left-by-a-killed-server").write_bytes(b"partial")
    server.start()
    assert not list((server.root / "tmp").iterdir())


def test_put_many_stores_in_order_and_refreshes_what_is_stored(tmp_path):
    store = BlobStore(tmp_path, max_file_size=1 << 20)
    known = store.put(b"already stored")
    os.utime(store.path(known), (HOURS_AGO, HOURS_AGO))

    datas = [b"one", b"already stored", b"two", b"one", b""]
    assert store.put_many(datas) == [sha(d) for d in datas]
    assert all(store.path(sha(d)).read_bytes() == d for d in datas)
    assert store.path(known).stat().st_mtime > time.time() - 60, "a blob a commit is about to reference is protected"
    assert not list((tmp_path / "tmp").iterdir())
