"""The ui/ command: `loradock ui`, the Streamlit comparison screen (ui/app.py) in headless mode."""

from dataclasses import dataclass, field

from loradock.config import add_config_flags

DEFAULT_ENDPOINT = "http://127.0.0.1:8000/v1"


@dataclass
class UIConfig:
    """What `loradock ui` runs: the screen's address, the endpoint and registry it reads, its votes."""

    endpoint: str = field(default=DEFAULT_ENDPOINT, metadata={
        "help": "the OpenAI-compatible endpoint, e.g. `loradock serve`'s; an API key is read from LORADOCK_API_KEY"})
    registry: str | None = field(default=None, metadata={
        "help": "registry URL for hot-loadable adapters and their cards (none: $HF_ENDPOINT, else http://127.0.0.1:8090)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8501, metadata={"help": "port to listen on"})
    votes: str | None = field(default=None, metadata={"help": "the votes database (none: $LORADOCK_HOME/ui/votes.sqlite)"})


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ui", help="a chat screen that compares the base model's answers with its adapters' side by side",
        description="Start the Streamlit comparison screen (headless; open the printed URL). Each message goes to "
                    "the base model and one to three adapters through the OpenAI-compatible endpoint; answers "
                    "stream side by side. Blind A/B votes are kept in SQLite and export as training data.",
    )
    add_config_flags(p, UIConfig, example="ui.yaml")
    p.set_defaults(func=run_ui)


def check_args(args: UIConfig) -> list[tuple[str, str]]:
    """Every problem with the flags, as (problem, fix)."""
    import socket

    problems = []
    if not args.endpoint.startswith(("http://", "https://")):
        problems.append((f"--endpoint {args.endpoint!r} is not an http(s) URL", f"pass e.g. --endpoint {DEFAULT_ENDPOINT}"))
    if args.registry and not args.registry.startswith(("http://", "https://")):
        problems.append((f"--registry {args.registry!r} is not an http(s) URL", "pass e.g. --registry http://127.0.0.1:8090"))
    if not 0 < args.port < 65536:
        problems.append((f"--port {args.port} is not a TCP port", "pass --port from 1 to 65535"))
        return problems
    with socket.socket() as s:
        try:
            s.bind((args.host, args.port))
        except OSError as e:
            problems.append((f"cannot listen on {args.host}:{args.port} ({e.strerror})",
                             "pass --port with a free port, or stop what is using it"))
    return problems


def run_ui(args) -> int:
    import os
    import signal
    from pathlib import Path

    from hub.client import endpoint_url
    from loradock.config import from_command_line, print_config
    from loradock.errors import LoradockError
    from loradock.home import home
    from loradock.procs import Service
    from ui import ENDPOINT_ENV, REGISTRY_ENV, VOTES_ENV

    config = from_command_line(UIConfig, args, what="the UI configuration").args
    if getattr(args, "print_config", False):
        return print_config(config)
    problems = check_args(config)
    if problems:
        raise LoradockError("; ".join(p for p, _ in problems), "; ".join(f for _, f in problems))
    endpoint = config.endpoint.rstrip("/")
    endpoint = endpoint if endpoint.endswith("/v1") else endpoint + "/v1"
    env = {**os.environ, ENDPOINT_ENV: endpoint, REGISTRY_ENV: endpoint_url(config.registry)}
    if config.votes:
        env[VOTES_ENV] = str(Path(config.votes).resolve())
    url, log = f"http://{config.host}:{config.port}", home() / "logs" / f"ui-{config.port}.log"
    app = Service("Streamlit", streamlit_command(config.host, config.port), log, env=env, grace=30)
    stopping = []

    def on_signal(signum, frame):  # the main thread is waiting on Streamlit: only signal it here
        stopping.append(signum)
        app.process.terminate()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    try:
        app.wait_healthy(f"{url}/_stcore/health", timeout=120)
        print(f"loradock ui: {url}  (endpoint {endpoint}, registry {env[REGISTRY_ENV]}; log: {log})", flush=True)
        code = app.process.wait()
    except LoradockError:
        if stopping:
            return 0
        raise
    finally:
        app.stop()
    if stopping:
        return 0
    raise LoradockError(f"Streamlit exited with status {code}", f"see its log in {log}")


def streamlit_command(host: str, port: int) -> list[str]:
    """`streamlit run ui/app.py` with the same Python, headless, without usage statistics or file watching."""
    import sys
    from pathlib import Path

    return [sys.executable, "-m", "streamlit", "run", str(Path(__file__).with_name("app.py")), "--server.headless",
            "true", "--server.address", host, "--server.port", str(port), "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal"]
