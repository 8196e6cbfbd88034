"""loradock balance --replica HOST:PORT --replica HOST:PORT [--port 8080] [--host 127.0.0.1] [--affinity]

nginx in front of several `loradock serve` replicas sharing one registry: the template
`serve/configs/nginx.conf` is filled in (listen address, replicas, paths under the run folder),
written to `--run-dir`, checked with `nginx -t`, then nginx runs in the foreground until this
process gets SIGINT or SIGTERM. Replicas need no adapter state of the balancer's: each hot-loads
`org/adapter@revision` on its first request, pinned to the same commit sha as the others.

    from serve.balancer import BalancerConfig, render
    text = render(BalancerConfig(replica=["127.0.0.1:8001", "127.0.0.1:8002"], port=8080), Path("run"))
"""

import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from loradock.errors import LoradockError
from loradock.home import home
from loradock.procs import http_status, log_tail

TEMPLATE = Path(__file__).resolve().parent / "configs" / "nginx.conf"
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
HEALTH = "/balancer/health"  # answered by nginx itself (see the template)
ROUND_ROBIN = "# round robin: nginx's default (`loradock balance --affinity` hashes on the model header instead)"
AFFINITY = "hash $loradock_affinity_key consistent;  # --affinity: one adapter, one replica"


@dataclass
class BalancerConfig:
    """What `loradock balance` runs: nginx, listening on one address, spreading over the replicas."""

    replica: list[str] = field(default_factory=list, metadata={
        "help": "a `loradock serve` replica to balance over; repeat it for each", "metavar": "HOST:PORT"})
    host: str = field(default="127.0.0.1", metadata={"help": "address the balancer listens on"})
    port: int = field(default=8080, metadata={"help": "port the balancer listens on"})
    affinity: bool = field(default=False, metadata={
        "help": "send each model's requests to one replica (a consistent hash of the X-Loradock-Model header "
                "loradock's clients set): fewer cold loads, less even load; false: round robin"})
    max_fails: int = field(default=1, metadata={
        "help": "failed attempts (refused, timed out, 502/503/504) after which a replica is skipped for --fail-timeout"})
    fail_timeout: int = field(default=10, metadata={"help": "seconds a failed replica is skipped before it is tried again"})
    run_dir: str | None = field(default=None, metadata={
        "help": "folder for the rendered nginx.conf, its logs, pid and temp files (none: $LORADOCK_HOME/balancer/PORT)"})
    nginx: str | None = field(default=None, metadata={
        "help": "the nginx binary (none: nginx on PATH, else /usr/sbin/nginx)"})


def parse_replica(spec: str) -> tuple[str, int]:
    """(host, port) of `HOST:PORT` or `[IPV6]:PORT`.

    Raises:
        ValueError: naming what is wrong.
    """
    host, sep, port = spec.rpartition(":")
    if not sep or not host or "/" in spec or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--replica {spec!r} is not HOST:PORT; pass e.g. --replica 127.0.0.1:8001")
    if ":" in host and not re.fullmatch(r"\[[0-9a-fA-F:.]+\]", host):
        raise ValueError(f"--replica {spec!r}: write an IPv6 address in brackets, e.g. --replica [::1]:8001")
    return host, int(port)


def validate(config: BalancerConfig) -> list[str]:
    problems = []
    if not config.replica:
        problems.append("no --replica given; pass one --replica HOST:PORT per `loradock serve` replica")
    seen = set()
    for spec in config.replica:
        try:
            replica = parse_replica(spec)
        except ValueError as e:
            problems.append(str(e))
            continue
        if replica in seen:
            problems.append(f"--replica {spec} is given twice; list each replica once")
        seen.add(replica)
    if not re.fullmatch(r"[A-Za-z0-9.\-]+|\[?[0-9a-fA-F:.]+\]?", config.host):
        problems.append(f"--host {config.host!r} is not a host name or an IP address; pass e.g. --host 127.0.0.1")
    if not 0 < config.port < 65536:
        problems.append(f"--port {config.port} is not a TCP port; pass --port from 1 to 65535")
    if config.max_fails < 0:
        problems.append(f"--max-fails {config.max_fails} must be 0 (never skip a replica) or more")
    if config.fail_timeout < 1:
        problems.append(f"--fail-timeout {config.fail_timeout} must be at least 1 second")
    return problems


def run_dir_of(config: BalancerConfig) -> Path:
    return Path(config.run_dir or home() / "balancer" / str(config.port)).resolve()


def render(config: BalancerConfig, run: Path) -> str:
    """The nginx configuration for `config`, its files under `run` (an absolute path)."""
    host = f"[{config.host}]" if ":" in config.host and not config.host.startswith("[") else config.host
    servers = "\n".join(f"        server {spec} max_fails={config.max_fails} fail_timeout={config.fail_timeout}s;"
                        for spec in config.replica)
    values = {"RUN": str(run), "LISTEN": f"{host}:{config.port}", "SERVERS": servers,
              "BALANCE": AFFINITY if config.affinity else ROUND_ROBIN, "TRIES": str(len(config.replica))}
    text = TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    assert not re.search(r"@[A-Z_]+@", text), "a placeholder of serve/configs/nginx.conf was not filled in"
    return text


def nginx_binary(config: BalancerConfig) -> str:
    found = config.nginx or shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not found or not Path(found).exists():
        where = f"--nginx {config.nginx} does not exist" if config.nginx else "no nginx on PATH nor /usr/sbin/nginx"
        raise LoradockError(f"loradock balance runs nginx, and there is none here ({where})",
                            "install Debian's nginx (`sudo apt-get install nginx`, or `make nginx`), or pass --nginx PATH")
    return found


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nginx binds: a TIME_WAIT port is free
        try:
            s.bind((host.strip("[]"), port))
        except OSError as e:
            raise LoradockError(f"the balancer cannot listen on {host}:{port} ({e.strerror})",
                                "pass another --port (or stop what listens there)") from None


def prepare(config: BalancerConfig) -> tuple[list[str], Path]:
    """The nginx command line, with its configuration written to the run folder and checked by `nginx -t`."""
    nginx, run = nginx_binary(config), run_dir_of(config)
    for name in TEMP_DIRS:
        (run / "temp" / name).mkdir(parents=True, exist_ok=True)
    conf = run / "nginx.conf"
    conf.write_text(render(config, run))
    command = [nginx, "-p", str(run), "-c", str(conf), "-e", str(run / "error.log")]
    checked = subprocess.run([*command, "-t", "-q"], capture_output=True, text=True)
    if checked.returncode:
        raise LoradockError(f"nginx refused the configuration {conf}:\n{(checked.stderr or checked.stdout).strip()}",
                            "fix the flag it names (the template is serve/configs/nginx.conf)")
    return command, run


def balance(config: BalancerConfig, ready_timeout: float = 15) -> int:
    """Run nginx in the foreground until it exits or this process gets SIGINT/SIGTERM (then nginx
    stops gracefully: requests in flight finish, new connections are refused)."""
    check_port_free(config.host, config.port)
    command, run = prepare(config)
    nginx = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    stopping = []

    def on_signal(signum, frame):
        # The first signal is nginx's graceful stop (SIGQUIT), a second one its fast stop.
        if nginx.poll() is None:
            nginx.send_signal(signal.SIGTERM if stopping else signal.SIGQUIT)
        stopping.append(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    local = "127.0.0.1" if config.host in ("0.0.0.0", "::", "[::]") else config.host
    url = f"http://{local}:{config.port}"
    deadline = time.monotonic() + ready_timeout
    while http_status(url + HEALTH) != 200 and nginx.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if nginx.poll() is None and not stopping:
        print(f"balancing {url}/v1 over {len(config.replica)} replica(s) "
              f"({'affinity on X-Loradock-Model' if config.affinity else 'round robin'}; "
              f"config and logs in {run})", flush=True)
        for spec in config.replica:
            up = http_status(f"http://{spec}/health") == 200
            print(f"  replica {spec}: {'up' if up else 'not answering yet (skipped until it does)'}", flush=True)
    code = nginx.wait()
    if stopping:
        print("stopped", flush=True)
        return 0
    raise LoradockError(f"nginx exited with status {code}; its log ends:\n{log_tail(run / 'error.log')}",
                        f"see the whole log in {run / 'error.log'}")
