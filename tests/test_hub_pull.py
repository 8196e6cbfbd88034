"""`loradock pull` against an endpoint that lies, and two pulls of one commit at once.

The lying endpoint is a real HTTP server in the test that answers what huggingface_hub's
`model_info(files_metadata=True)` and the downloads ask for; the concurrent pulls run against the
session's `loradock hub serve`, each in its own process, as `loradock serve` and a user's shell would.
And pulls from a registry stopped with SIGSTOP, before and during the download.
"""

import contextlib
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hub.objects import git_blob_sha1
from tests.conftest import adapter_folder, run_loradock

REPO_ID = "evil/adapter"
COMMIT = "5" * 40
CONTENT = b"pwned"


class LyingRegistry:
    """A Hub endpoint on 127.0.0.1 that lists `siblings` (and `sha`) for every revision of every
    repo, and answers every download with the chunks of `body`: what a compromised registry, or a
    man in the middle on plain http, can send. Records the paths asked for, and whether a download
    was cut off by the client before the whole body was sent."""

    def __init__(self, siblings: list[dict], body=(CONTENT,), sha: str = COMMIT):
        self.siblings, self.body, self.sha = siblings, body, sha
        self.requested: list[str] = []
        self.cut_off = threading.Event()  # set by the handler's thread, which may run after the client is done
        lying = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                lying.requested.append(self.path)
                if self.path.startswith("/api/models/"):
                    answer = json.dumps({"id": REPO_ID, "sha": lying.sha, "siblings": lying.siblings}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                    return
                self.send_response(200)  # no Content-Length: the body ends when the server closes
                self.end_headers()
                try:
                    for chunk in lying.body:
                        self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    lying.cut_off.set()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "LyingRegistry":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    @property
    def downloads(self) -> list[str]:
        return [p for p in self.requested if not p.startswith("/api/")]


def sibling(name, content: bytes = CONTENT) -> dict:
    return {"rfilename": name, "size": len(content), "blobId": git_blob_sha1(content)}


def files_under(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """No stored token is read or sent: the lying endpoint is nobody's registry."""
    monkeypatch.setenv("LORADOCK_CONFIG_DIR", str(tmp_path / "config"))


# Each name with where it would land on a pull to tmp_path/work/a/b/out (staged in tmp_path/work/a/b),
# relative to tmp_path; None where it would land inside the pull folder.
HOSTILE_NAMES = [
    ("../../x", "work/a/x"),
    ("a/../../x", "work/a/b/x"),
    ("../out-sibling/x", "work/a/b/out-sibling/x"),
    ("/ABS/x", "abs/x"),  # /ABS is replaced by tmp_path/abs
    ("..\\..\\x", None),
    ("a//b", None),
    ("./a", None),
    ("", None),
    ("a\nb", None),
    ("a\x1bb", None),
    (".git/hooks/post-checkout", None),
    (42, None),  # not even a string
]


@pytest.mark.parametrize("name,lands", HOSTILE_NAMES, ids=[repr(n) for n, _ in HOSTILE_NAMES])
def test_a_file_name_outside_the_repo_is_refused_before_any_download(run_cli, no_token, tmp_path, name, lands):
    name = name.replace("/ABS", str(tmp_path / "abs")) if isinstance(name, str) else name
    target = tmp_path / "work" / "a" / "b" / "out"
    (tmp_path / "work").mkdir()
    before = files_under(tmp_path)
    with LyingRegistry([sibling("adapter_config.json"), sibling(name)]) as lying:
        result = run_cli("pull", f"{REPO_ID}@main", "--registry", lying.url, "--to", target)
    assert result.code == 2, result.text
    assert f"answered a file name outside the repo: {name!r}" in result.err and "nothing was kept" in result.err
    assert lying.downloads == []
    if lands:
        assert not (tmp_path / lands).exists()
    assert files_under(tmp_path) == before  # not even the folders above the target


def test_a_name_that_resolves_outside_the_folder_through_a_link_is_refused(tmp_path):
    from hub.transfer import path_in

    folder, outside = tmp_path / "staging", tmp_path / "outside"
    folder.mkdir(), outside.mkdir()
    (folder / "link").symlink_to(outside)
    assert path_in(folder, "link/x") is None
    assert path_in(folder, "sub/x") == folder / "sub" / "x"


def test_a_file_named_like_the_pull_marker_is_refused(run_cli, no_token, tmp_path):
    target = tmp_path / "out"
    with LyingRegistry([sibling("adapter_config.json"), sibling(".loradock-pull.json")]) as lying:
        result = run_cli("pull", f"{REPO_ID}@main", "--registry", lying.url, "--to", target)
    assert result.code == 2, result.text
    assert "'.loradock-pull.json'" in result.err and "nothing was kept" in result.err
    assert lying.downloads == [] and not target.exists() and not list(tmp_path.glob(".out.pulling-*"))


def test_a_commit_sha_that_is_a_path_is_refused(run_cli, no_token, tmp_path, monkeypatch):
    monkeypatch.setenv("LORADOCK_HOME", str(tmp_path / "home"))
    with LyingRegistry([sibling("adapter_config.json")], sha="../../../x") as lying:
        result = run_cli("pull", f"{REPO_ID}@main", "--registry", lying.url)  # to $LORADOCK_HOME/pulled/REPO/SHA
    assert result.code == 2, result.text
    assert "'../../../x'" in result.err and "not a 40-character commit sha" in result.err
    assert lying.downloads == [] and not (tmp_path / "home" / "x").exists()


def test_a_listing_without_sizes_is_refused(run_cli, no_token, tmp_path):
    target = tmp_path / "out"
    with LyingRegistry([{"rfilename": "adapter_config.json", "blobId": git_blob_sha1(CONTENT)}]) as lying:
        result = run_cli("pull", f"{REPO_ID}@main", "--registry", lying.url, "--to", target)
    assert result.code == 2, result.text
    assert "did not say how large 'adapter_config.json' is" in result.err
    assert lying.downloads == [] and not target.exists()


def test_more_bytes_than_announced_are_never_written(run_cli, no_token, tmp_path):
    target = tmp_path / "out"
    endless = (b"\0" * (1 << 20) for _ in range(64))  # 64 MiB, far past what the sockets buffer
    with LyingRegistry([{"rfilename": "adapter_model.safetensors", "size": 10, "blobId": "0" * 40}], endless) as lying:
        result = run_cli("pull", f"{REPO_ID}@main", "--registry", lying.url, "--to", target)
    assert result.code == 2, result.text
    assert "adapter_model.safetensors: received more than the 10 bytes announced" in result.err
    assert "nothing was kept" in result.err
    # The client stopped reading, and did not drain the stream to disk: the server's next writes
    # fail (seen by its thread, which a loaded machine may run a moment later).
    assert lying.cut_off.wait(30)
    assert not target.exists() and not list(tmp_path.glob(".out.pulling-*"))


@pytest.mark.parametrize("to", ["default", "empty-folder"])
def test_two_pulls_of_one_commit_under_two_names_both_succeed(run_cli, hub_env, tmp_path, to):
    """`loradock serve` pulls `x@main` and `x@v1` at once when a request names each; both are one
    commit, so one folder. 24 MiB of weights keep each download long enough that the two pulls
    overlap nearly every time (they did on every attempt, and failed, before the fix)."""
    folder = adapter_folder(tmp_path / "adapter", weights=os.urandom(24 << 20))
    pushed = run_cli("push", folder, f"alice/raced-{to}", "--tag", "v1")
    assert pushed.code == 0, pushed.text
    commit = pushed.out.split("commit ")[1].split()[0]
    for attempt in range(6):
        home = tmp_path / f"home-{attempt}"
        env = {**os.environ, "LORADOCK_HOME": str(home)}
        if to == "default":
            dest, flags = home / "pulled" / "alice" / f"raced-{to}" / commit, []
        else:
            dest = home / "out"
            dest.mkdir(parents=True)
            flags = ["--to", dest]
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(lambda revision: run_loradock("pull", f"alice/raced-{to}@{revision}", *flags,
                                                                  env=env, timeout=300), ["main", "v1"]))
        for result in results:
            assert result.returncode == 0, result.stdout + result.stderr
            assert f"is commit {commit}" in result.stdout and f"verified and in {dest}" in result.stdout
        for name in ("adapter_config.json", "adapter_model.safetensors", "chat_template.jinja"):
            assert (dest / name).read_bytes() == (folder / name).read_bytes()
        assert json.loads((dest / ".loradock-pull.json").read_text())["commit"] == commit
        assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # no staging folder left behind


# --- a registry that stops answering -----------------------------------------------------------------

@contextlib.contextmanager
def stopped(process):
    """`process` (and its process group) stopped with SIGSTOP for the block: its sockets stay open,
    it answers nothing; SIGCONT afterwards, whatever happens."""
    os.killpg(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(process.pid, signal.SIGCONT)


def test_a_stopped_registry_is_unreachable_within_seconds_then_served_again(run_cli, hub_env, tmp_path, monkeypatch):
    """What `loradock serve` does for an adapter it has not loaded (`hub.pulled.pull_leased`), and
    `loradock pull`: against a registry stopped by SIGSTOP, Unreachable (a 503 when serving) within
    the bound on a registry's silence (READ_S); the same call succeeds once it runs again."""
    from hub.pulled import pull_leased
    from hub.timeouts import READ_S
    from loradock.errors import Unreachable

    monkeypatch.setenv("LORADOCK_HOME", str(tmp_path / "home"))
    assert run_cli("push", adapter_folder(tmp_path / "adapter"), "alice/frozen").code == 0
    with stopped(hub_env.process):
        started = time.monotonic()
        with pytest.raises(Unreachable, match=f"the registry at {hub_env.url} did not answer within {READ_S:g} s"):
            pull_leased("alice/frozen")
        waited = time.monotonic() - started
        started = time.monotonic()
        pulled = run_loradock("pull", "alice/frozen", "--to", tmp_path / "out", timeout=120)
        cli_waited = time.monotonic() - started
    assert waited < READ_S + 5, f"Unreachable after {waited:.1f} s"
    assert pulled.returncode == 2 and cli_waited < READ_S + 15, (cli_waited, pulled.stdout + pulled.stderr)
    assert f"did not answer within {READ_S:g} s" in pulled.stderr and "Traceback" not in pulled.stderr
    assert not (tmp_path / "out").exists()
    result, lease = pull_leased("alice/frozen")
    lease.release()
    weights = "adapter_model.safetensors"
    assert (result.path / weights).read_bytes() == (tmp_path / "adapter" / weights).read_bytes()


def test_a_registry_that_stops_mid_download_is_unreachable_and_nothing_is_kept(hub_env, tmp_path):
    """The registry is stopped as soon as the pull starts downloading 40 MB: the download gives up
    after READ_S of silence, and no file of it is left."""
    from hub.client import Registry
    from hub.timeouts import READ_S
    from loradock.errors import Unreachable

    Registry().push(adapter_folder(tmp_path / "adapter", weights=os.urandom(40 << 20)), "alice/frozen-mid-download")
    out, done = tmp_path / "out", threading.Event()

    def stop_once_downloading() -> None:
        while not done.is_set():
            if list(tmp_path.glob(".out.pulling-*")):
                os.killpg(hub_env.process.pid, signal.SIGSTOP)
                return
            time.sleep(0.001)

    watcher = threading.Thread(target=stop_once_downloading)
    watcher.start()
    try:
        started = time.monotonic()
        with pytest.raises(Unreachable, match=f"did not answer within {READ_S:g} s while alice/frozen-mid-download@main was "
                                              "downloading; nothing was kept"):
            Registry().pull("alice/frozen-mid-download", to=str(out))
        waited = time.monotonic() - started
    finally:
        done.set()
        watcher.join()
        os.killpg(hub_env.process.pid, signal.SIGCONT)
    assert waited < READ_S + 5, f"Unreachable after {waited:.1f} s"
    assert not out.exists() and not list(tmp_path.glob(".out.pulling-*"))
    assert Registry().pull("alice/frozen-mid-download", to=str(out)).path == out
