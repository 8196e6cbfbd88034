"""`loradock balance` (nginx in front of several `loradock serve` replicas) without vLLM: the rendered
configuration, nginx itself balancing and retrying over two tiny HTTP listeners, the refusals, the
model header loradock's own clients set, and the tensor-parallel serving config. The same balancer in
front of two real vLLM replicas is tests/test_replicas.py (slow)."""

import http.server
import json
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import httpx2
import pytest

from hub.adapter import MODEL_HEADER
from loradock.procs import Service, free_port, loradock_command
from serve.balancer import BalancerConfig, nginx_binary, render
from tests.conftest import ASSETS, REPO, vllm_server_args

HAS_NGINX = bool(shutil.which("nginx") or Path("/usr/sbin/nginx").exists())
needs_nginx = pytest.mark.skipif(not HAS_NGINX, reason="needs nginx (`make nginx`: apt-get install nginx)")


class Listener:
    """A tiny HTTP server on a free port, in a thread: records each request's path and headers and
    answers `status` with an OpenAI-shaped body naming its own port."""

    def __init__(self, status: int = 200):
        self.requests, listener = [], self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                listener.requests.append({"path": self.path, "body": body,
                                          "headers": {k.lower(): v for k, v in self.headers.items()}})
                payload = (json.dumps({"port": listener.port}) if status == 200 else json.dumps(
                    {"error": {"message": "no such model", "type": "NotFoundError", "param": "model", "code": status}}))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Connection", "close")  # once closed, the listener answers nothing more
                self.end_headers()
                self.wfile.write(payload.encode())

            do_GET = do_POST = answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listeners():
    made = []

    def make(status: int = 200) -> Listener:
        made.append(Listener(status))
        return made[-1]

    yield make
    for listener in made:
        listener.close()


def nginx_t(text: str, run: Path) -> subprocess.CompletedProcess:
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (run / "temp" / name).mkdir(parents=True, exist_ok=True)
    (run / "nginx.conf").write_text(text)
    return subprocess.run([nginx_binary(BalancerConfig()), "-t", "-p", str(run), "-c", str(run / "nginx.conf"),
                           "-e", str(run / "error.log")], capture_output=True, text=True)


@pytest.mark.parametrize("affinity", [False, True], ids=["round-robin", "affinity"])
def test_the_rendered_config_retries_posts_and_hashes_only_with_affinity(affinity, tmp_path):
    config = BalancerConfig(replica=["127.0.0.1:8001", "10.0.0.2:8002", "[::1]:8003"], port=18080, affinity=affinity,
                            max_fails=2, fail_timeout=7)
    text = render(config, tmp_path)
    for line in ("listen 127.0.0.1:18080;", "server 127.0.0.1:8001 max_fails=2 fail_timeout=7s;",
                 "server 10.0.0.2:8002 max_fails=2 fail_timeout=7s;", "server [::1]:8003 max_fails=2 fail_timeout=7s;",
                 "proxy_next_upstream error timeout http_502 http_503 http_504 non_idempotent;",
                 "proxy_next_upstream_tries 3;", "proxy_buffering off;", "proxy_http_version 1.1;",
                 f"pid {tmp_path}/nginx.pid;", "daemon off;", "zone loradock_replicas"):
        assert line in text, line
    assert not re.search(r"@[A-Z_]+@", text)  # every placeholder filled in
    assert ("hash $loradock_affinity_key consistent;" in text) == affinity
    assert '""      $request_id;' in text  # no header: spread, not all on one replica
    if HAS_NGINX:
        checked = nginx_t(text, tmp_path)
        assert checked.returncode == 0, checked.stderr


@needs_nginx
def test_nginx_spreads_requests_and_retries_a_post_on_the_live_replica(listeners, tmp_path):
    first, second = listeners(), listeners()
    port, run = free_port(), tmp_path / "run"
    balancer = Service("loradock balance", loradock_command(
        "balance", "--replica", f"127.0.0.1:{first.port}", "--replica", f"127.0.0.1:{second.port}",
        "--port", port, "--run-dir", run), tmp_path / "balance.log", grace=10)
    try:
        balancer.wait_healthy(f"http://127.0.0.1:{port}/balancer/health", timeout=20)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        answered = [httpx2.post(url, json={"model": "a/b"}).json()["port"] for _ in range(4)]
        assert sorted(answered) == sorted([first.port, second.port] * 2)  # round robin
        second.close()
        for _ in range(4):  # the dead one is tried (or skipped), and the POST goes to the live one
            response = httpx2.post(url, json={"model": "a/b"})
            assert response.status_code == 200 and response.json()["port"] == first.port
        assert f"127.0.0.1:{second.port}, 127.0.0.1:{first.port}" in (run / "access.log").read_text()  # a retry
    finally:
        code = balancer.stop()
    assert code == 0 and "stopped" in (tmp_path / "balance.log").read_text()


@needs_nginx
def test_affinity_keeps_a_model_on_one_replica(listeners, tmp_path):
    replicas = [listeners() for _ in range(3)]
    port = free_port()
    with Service("loradock balance", loradock_command(
            "balance", *[f"--replica=127.0.0.1:{r.port}" for r in replicas], "--port", port, "--affinity",
            "--run-dir", tmp_path / "run"), tmp_path / "balance.log", grace=10) as balancer:
        balancer.wait_healthy(f"http://127.0.0.1:{port}/balancer/health", timeout=20)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for model in ("alice/reverse@v1", "alice/sort@v1", "bob/commas"):
            ports = {httpx2.post(url, json={"model": model}, headers={MODEL_HEADER: model}).json()["port"]
                     for _ in range(6)}
            assert len(ports) == 1, (model, ports)
        anonymous = {httpx2.post(url, json={}).json()["port"] for _ in range(12)}  # no header: by request id
        assert len(anonymous) > 1


@pytest.mark.parametrize("flags, words", [
    ([], "no --replica given"),
    (["--replica", "localhost"], "--replica 'localhost' is not HOST:PORT"),
    (["--replica", "http://127.0.0.1:8000"], "is not HOST:PORT"),
    (["--replica", "127.0.0.1:8000", "--replica", "127.0.0.1:8000"], "is given twice"),
    (["--replica", "127.0.0.1:8000", "--nginx", "/no/such/nginx"], "sudo apt-get install nginx"),
    (["--replica", "127.0.0.1:8000", "--host", "0.0.0.0:80; include /etc/passwd"], "is not a host name or an IP address"),
])
def test_bad_input_is_refused_with_the_fix(flags, words, run_cli, tmp_path):
    result = run_cli("balance", *flags, "--run-dir", tmp_path)
    assert result.code == 2 and words in result.err, result.err
    assert "Traceback" not in result.err


def test_a_port_in_use_is_refused(run_cli, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("balance", "--replica", "127.0.0.1:8001", "--port", port, "--run-dir", tmp_path)
    assert result.code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.err and "--port" in result.err


def test_loradocks_clients_name_the_model_in_a_header(listeners, tmp_path):
    """The comparison screen's client and `loradock eval --base-url` set X-Loradock-Model on every
    request, to the model that request names (what the balancer's affinity hashes on)."""
    from loradock.errors import LoradockError
    from sft.evaluate import evaluate_endpoint
    from ui.client import Endpoint, Sampling

    endpoint = listeners(status=404)
    url = f"http://127.0.0.1:{endpoint.port}/v1"
    client = Endpoint(url)
    for model in ("alice/reverse@v1", "alice/sort@v1"):
        stream = client.stream_chat(model, [{"role": "user", "content": "a b"}], Sampling())
        list(stream)
    with pytest.raises(Exception):
        client.rendered_prompt("alice/commas", [1, 2])
    with pytest.raises(LoradockError, match="answered 404"):
        evaluate_endpoint(url, ["bob/json@v2"], str(ASSETS / "tasks" / "reverse" / "heldout.jsonl"), limit=2)
    seen = [(r["path"], r["headers"].get(MODEL_HEADER.lower()), r["body"].get("model")) for r in endpoint.requests]
    assert seen == [("/v1/chat/completions", "alice/reverse@v1", "alice/reverse@v1"),
                    ("/v1/chat/completions", "alice/sort@v1", "alice/sort@v1"),
                    ("/detokenize", "alice/commas", "alice/commas"),
                    ("/v1/chat/completions", "bob/json@v2", "bob/json@v2")]


def test_the_tensor_parallel_config_loads_and_reaches_vllm(tmp_path, monkeypatch, capsys):
    """serve/configs/tensor-parallel.yaml through serve's own loader, then vLLM's own parser."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from loradock.cli import make_parser
    from serve.cli import resolve
    from serve.launcher import vllm_command, write_vllm_config

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("LORADOCK_HOME", str(tmp_path))
    config = resolve(make_parser().parse_args(["serve", "--config", "serve/configs/tensor-parallel.yaml"]))
    assert config.vllm["tensor_parallel_size"] == 2
    config.base_path = "some/model"
    command = vllm_command(config, on_gpu=True, vllm_config=write_vllm_config(config))
    parsed = vllm_server_args(command)
    assert parsed.tensor_parallel_size == 2 and parsed.pipeline_parallel_size == 1 and parsed.enable_lora
    assert "--tensor-parallel-size" in FlexibleArgumentParser().load_config_file(command[command.index("--config") + 1])
