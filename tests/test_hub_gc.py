"""The blob store's housekeeping against a running `loradock hub serve`, through huggingface_hub:
`loradock hub gc` reclaims what no commit references and nothing else, and uploads in flight
survive gc, other `hub` commands and a second server on the same root."""

import hashlib
import os
import re
import subprocess
import threading
import time

import httpx2
import pytest
from huggingface_hub import CommitOperationAdd
from huggingface_hub.errors import HfHubHTTPError

from hub.blobs import BlobStore
from hub.client import hub_api
from loradock.procs import create_token, loradock_command
from tests.conftest import RegistryProcess

HOURS_AGO = time.time() - 3 * 3600  # older than gc's default grace period
REMOVED = re.compile(r"(?:removed|would remove) (\d+) unreferenced blobs?: .*\(([\d,]+) bytes\)")


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


def stored(server) -> dict[str, int]:
    """sha256 -> size of every blob on disk."""
    return {path.name: path.stat().st_size for path in (server.root / "blobs").glob("*/*")}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gc(run_cli, server, *flags) -> tuple[int, int]:
    """`loradock hub gc --root ROOT FLAGS`; the (count, bytes) it reports removed."""
    result = run_cli("hub", "gc", "--root", server.root, *flags)
    assert result.code == 0, result.text
    match = REMOVED.search(result.out)
    assert match, result.text
    return int(match[1]), int(match[2].replace(",", ""))


def push(server, repo_id: str, files: dict[str, bytes]) -> str:
    server.api.create_repo(repo_id)
    operations = [CommitOperationAdd(path, data) for path, data in files.items()]
    return server.api.create_commit(repo_id, operations, commit_message="files").oid


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


def test_gc_reclaims_a_deleted_repos_blobs_and_keeps_the_others(server, run_cli, tmp_path):
    gone = {"adapter_model.safetensors": os.urandom(2 << 20), "notes.txt": b"only in the deleted repo"}
    kept = {"adapter_model.safetensors": os.urandom(3 << 20), "notes.txt": b"in the repo that stays"}
    push(server, "alice/gone", gone)
    push(server, "alice/kept", kept)
    server.api.delete_repo("alice/gone")
    for path in (server.root / "blobs").glob("*/*"):
        os.utime(path, (HOURS_AGO, HOURS_AGO))

    assert gc(run_cli, server) == (2, sum(len(d) for d in gone.values()))
    left = stored(server)
    assert not {sha(d) for d in gone.values()} & left.keys()
    assert {sha(d) for d in kept.values()} <= left.keys()
    assert all(len(list(shard.iterdir())) for shard in (server.root / "blobs").iterdir()), "empty shards are removed"
    assert_downloads(server, "alice/kept", kept, tmp_path / "cache")
    assert gc(run_cli, server) == (0, 0)


def test_gc_reclaims_the_files_of_a_commit_that_lost_a_412_race(server, run_cli, tmp_path):
    stale = push(server, "alice/race", {"a.txt": b"first"})
    server.api.create_commit("alice/race", [CommitOperationAdd("a.txt", b"second")], commit_message="moves main")
    lost = {"big.bin": os.urandom(2 << 20), "note.txt": b"from the push that lost"}
    with pytest.raises(HfHubHTTPError) as refused:
        server.api.create_commit("alice/race", [CommitOperationAdd(p, d) for p, d in lost.items()],
                                 commit_message="late", parent_commit=stale)
    assert refused.value.response.status_code == 412
    before = stored(server)
    assert sha(lost["big.bin"]) in before, "the LFS object was stored before the commit was refused"

    count, reclaimed = gc(run_cli, server, "--grace", "0")
    gone = before.keys() - stored(server).keys()
    assert sha(lost["big.bin"]) in gone and gone <= {sha(d) for d in lost.values()}
    assert (count, reclaimed) == (len(gone), sum(before[s] for s in gone))
    assert_downloads(server, "alice/race", {"a.txt": b"second"}, tmp_path / "cache")


def test_gc_dry_run_deletes_nothing_and_counts_the_same(server, run_cli):
    push(server, "alice/doomed", {"w.bin": os.urandom(2 << 20), "a.txt": b"doomed", "b.txt": b"doomed too"})
    server.api.delete_repo("alice/doomed")
    before = stored(server)

    result = run_cli("hub", "gc", "--root", server.root, "--dry-run", "--grace", "0")
    assert "nothing was deleted (--dry-run)" in result.out
    would = REMOVED.search(result.out)
    assert stored(server) == before
    assert (int(would[1]), int(would[2].replace(",", ""))) == (len(before), sum(before.values()))
    assert gc(run_cli, server, "--grace", "0") == (len(before), sum(before.values()))
    assert stored(server) == {}


def test_gc_keeps_an_uploaded_object_until_its_commit(server, run_cli, tmp_path):
    server.api.create_repo("alice/pending")
    data = os.urandom(2 << 20)
    assert httpx2.put(upload_url(server, "alice/pending", data), content=data).status_code == 200
    orphan = b"an old orphan gc must take"
    old = server.root / "blobs" / sha(orphan)[:2] / sha(orphan)
    old.parent.mkdir(exist_ok=True)
    old.write_bytes(orphan)
    os.utime(old, (HOURS_AGO, HOURS_AGO))

    assert gc(run_cli, server) == (1, len(orphan))
    assert sha(data) in stored(server) and not old.exists()
    server.api.create_commit("alice/pending", [CommitOperationAdd("weights.bin", data)], commit_message="weights")
    assert_downloads(server, "alice/pending", {"weights.bin": data}, tmp_path / "cache")


def test_gc_leaves_an_upload_in_flight_alone(server, run_cli, tmp_path):
    server.api.create_repo("alice/slow")
    data = os.urandom(6 << 20)
    upload = SlowPut(upload_url(server, "alice/slow", data), data).start_and_pause(server.root)
    in_tmp = {p.name for p in (server.root / "tmp").iterdir()}

    gc(run_cli, server, "--grace", "0")
    assert in_tmp <= {p.name for p in (server.root / "tmp").iterdir()}
    assert upload.finish() == 200
    server.api.create_commit("alice/slow", [CommitOperationAdd("weights.bin", data)], commit_message="weights")
    assert_downloads(server, "alice/slow", {"weights.bin": data}, tmp_path / "cache")


def test_gc_killed_midway_leaves_the_repos_intact_and_a_second_run_finishes(server, run_cli, tmp_path):
    repos = {f"alice/r{i}": {"adapter_model.safetensors": os.urandom(1 << 20 | i), "README.md": f"repo {i}".encode()}
             for i in range(3)}
    heads = {repo_id: push(server, repo_id, files) for repo_id, files in repos.items()}
    orphans = sorted(os.urandom(32).hex() for _ in range(8000))
    for name in orphans:
        path = server.root / "blobs" / name[:2] / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(name.encode())
        os.utime(path, (HOURS_AGO, HOURS_AGO))

    first = server.root / "blobs" / orphans[0][:2] / orphans[0]  # gc goes through the shards in order
    killed = subprocess.Popen(loradock_command("hub", "gc", "--root", server.root), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while first.exists() and killed.poll() is None and time.monotonic() < deadline:
        pass
    killed.kill()
    assert killed.wait() == -9, "gc ended before it could be killed mid-way"
    left = [name for name in orphans if (server.root / "blobs" / name[:2] / name).exists()]
    assert 0 < len(left) < len(orphans)

    for repo_id, files in repos.items():
        assert server.api.model_info(repo_id).sha == heads[repo_id]
        assert_downloads(server, repo_id, files, tmp_path / "cache")
    assert gc(run_cli, server) == (len(left), sum(len(name) for name in left))
    assert not set(orphans) & stored(server).keys()
    assert_downloads(server, "alice/r0", repos["alice/r0"], tmp_path / "cache2")


def test_gc_leaves_what_is_not_a_blob_alone(server, run_cli):
    strays = [server.root / "blobs" / "zz", server.root / "blobs" / "ab" / "notes.txt",
              server.root / "blobs" / "cd" / ("ab" + "0" * 62)]
    for path in strays:
        path.parent.mkdir(exist_ok=True)
        path.write_text("not a blob")
        os.utime(path, (HOURS_AGO, HOURS_AGO))

    result = run_cli("hub", "gc", "--root", server.root, "--grace", "0")
    assert result.code == 0, result.text
    assert all(path.exists() for path in strays)
    assert "left alone 3 entries of blobs/ that are not blobs" in result.out
    assert "blobs/zz" in result.out and "blobs/ab/notes.txt" in result.out


def test_gc_without_a_registry_names_the_root_and_the_fix(run_cli, tmp_path):
    result = run_cli("hub", "gc", "--root", tmp_path / "nothing")
    assert result.code == 2
    assert f"there is no registry at {tmp_path / 'nothing'}" in result.err
    assert "--root that `loradock hub serve` uses" in result.err
    assert not (tmp_path / "nothing").exists()


def test_put_many_stores_in_order_and_refreshes_what_is_stored(tmp_path):
    store = BlobStore(tmp_path, max_file_size=1 << 20)
    known = store.put(b"already stored")
    os.utime(store.path(known), (HOURS_AGO, HOURS_AGO))

    datas = [b"one", b"already stored", b"two", b"one", b""]
    assert store.put_many(datas) == [sha(d) for d in datas]
    assert all(store.path(sha(d)).read_bytes() == d for d in datas)
    assert store.path(known).stat().st_mtime > time.time() - 60, "a blob a commit is about to reference is protected"
    assert not list((tmp_path / "tmp").iterdir())
