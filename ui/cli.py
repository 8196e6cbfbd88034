"""The ui/ commands: `loradock ui`, the Streamlit comparison screen (ui/app.py) in headless mode;
`loradock votes report|export`, its blind votes as a ranking and as training data.

The endpoint and the registry are fixed here, at launch: the screen sends the serving key and the
Hub token to them only. Listening beyond localhost needs a password (or an explicit
--insecure-no-password), since whoever opens the page uses the endpoint with that key.
"""

from dataclasses import dataclass, field
from typing import Literal

from loradock.config import API_KEY_HELP, BASE_URL_HELP, REGISTRY_HELP, TOKEN_HELP, add_config_flags, subcommand

DEFAULT_ENDPOINT = "http://127.0.0.1:8000/v1"


@dataclass
class UIConfig:
    """What `loradock ui` runs: the screen's address, the endpoint and registry it reads, its votes."""

    base_url: str = field(default=DEFAULT_ENDPOINT, metadata={"help": "the models to compare: " + BASE_URL_HELP,
                                                             "was": ("endpoint",)})
    api_key: str | None = field(default=None, metadata={
        "help": API_KEY_HELP + "; a flag shows in `ps`, so prefer the variable", "secret": True})
    registry: str | None = field(default=None, metadata={
        "help": "for hot-loadable adapters and their cards: " + REGISTRY_HELP})
    token: str | None = field(default=None, metadata={"help": TOKEN_HELP, "secret": True})
    host: str = field(default="127.0.0.1", metadata={
        "help": "address to listen on; beyond localhost (e.g. 0.0.0.0) it needs --password"})
    port: int = field(default=8501, metadata={"help": "port to listen on"})
    votes: str | None = field(default=None, metadata={"help": "the votes database (none: $LORADOCK_HOME/ui/votes.sqlite)"})
    canary_pairs: str | None = field(default=None, metadata={
        "help": "the blind pairs `loradock serve` sampled from canary traffic, shown in the Canary tab: a folder of "
                "canary-pairs-*.jsonl files or one file (none: $LORADOCK_HOME/serve)", "metavar": "PATH"})
    password: str | None = field(default=None, metadata={
        "help": "every browser session must type it before the screen shows or sends anything "
                "(none: $LORADOCK_UI_PASSWORD, else no sign-in, which only localhost allows); a flag shows in `ps`, "
                "so prefer the variable", "secret": True})
    insecure_no_password: bool = field(default=False, metadata={
        "help": "listen beyond localhost with no password: only where something else guards the address "
                "(a VPN, an authenticating proxy), since every visitor uses the endpoint with its API key"})


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ui", help="a chat screen that compares the base model's answers with its adapters' side by side",
        description="Start the Streamlit comparison screen (headless; open the printed URL). Each message goes to "
                    "the base model and one to three adapters through the OpenAI-compatible endpoint; answers "
                    "stream side by side. Blind A/B votes are kept in SQLite and export as training data.",
    )
    add_config_flags(p, UIConfig, example="ui.yaml")
    p.set_defaults(func=run_ui)
    register_votes(subparsers)


VOTES_HELP = "the votes database (none: $LORADOCK_UI_VOTES, else $LORADOCK_HOME/ui/votes.sqlite)"


@dataclass
class ReportArgs:
    """Every pair of revisions that met in Blind A/B (ties and 'both bad' count half a win each way),
    and all of them ranked on Chatbot Arena's scale (400 * log10 strength, mean 1000), with
    percentile-bootstrap intervals."""

    votes: str | None = field(default=None, metadata={"help": VOTES_HELP, "metavar": "PATH"})
    format: Literal["markdown", "json"] = field(default="markdown", metadata={"help": "markdown tables or json"})
    output: str | None = field(default=None, metadata={"help": "write the report here (none: print it)",
                                                       "metavar": "FILE"})
    resamples: int = field(default=2000, metadata={"help": "bootstrap resamples for the intervals"})
    seed: int = field(default=0, metadata={"help": "the bootstrap's seed (the same seed, the same intervals)"})


@dataclass
class ExportArgs:
    """Write preferences.jsonl (prompt, chosen, rejected, system when set) and sft.jsonl (prompt,
    response) from the votes that picked a side, optionally only those with an adapter or a revision
    on either side; with --push, commit both to a dataset repo of the registry in one commit."""

    votes: str | None = field(default=None, metadata={"help": VOTES_HELP, "metavar": "PATH"})
    adapter: str | None = field(default=None, metadata={"help": "only votes with this adapter repo on either side",
                                                        "metavar": "REPO"})
    revision: str | None = field(default=None, metadata={
        "help": "only votes with this commit sha (or a prefix of 7 or more characters) on either side",
        "metavar": "SHA"})
    output: str | None = field(default=None, metadata={
        "help": "the folder to write (none: exports/TIME beside the votes database, as the screen's Export button "
                "does)", "metavar": "DIR"})
    push: str | None = field(default=None, metadata={
        "help": "commit both files to this dataset repo of the registry", "metavar": "REPO_ID"})
    registry: str | None = field(default=None, metadata={"help": REGISTRY_HELP, "metavar": "URL"})
    token: str | None = field(default=None, metadata={"help": TOKEN_HELP, "secret": True})


def register_votes(subparsers) -> None:
    votes = subparsers.add_parser("votes", help="the blind A/B votes: win rates and a ranking, or training data")
    sub = votes.add_subparsers(dest="votes_command", metavar="SUBCOMMAND", required=True)
    subcommand(sub, "report", ReportArgs, run_report, "votes-report.yaml",
               help="win rate per pair of revisions and a Bradley-Terry ranking, with 95%% intervals")
    subcommand(sub, "export", ExportArgs, run_export, "votes-export.yaml",
               help="the decided votes as preferences.jsonl and sft.jsonl, optionally pushed")


def votes_database(flag: str | None):
    """The votes database a command reads; it must exist (reading would create an empty one)."""
    import os
    from pathlib import Path

    from loradock.errors import LoradockError
    from ui import VOTES_ENV, votes

    path = Path(flag or os.environ.get(VOTES_ENV) or votes.default_path())
    if not path.is_file():
        raise LoradockError(f"no votes database at {path}",
                            "pass --votes PATH (the --votes of `loradock ui`), or vote in `loradock ui` (Blind A/B) first")
    return path


def run_report(args) -> int:
    import json
    from pathlib import Path

    from ui import ratings, votes

    rows = votes.outcomes(votes_database(args.votes))
    pair_rows = ratings.pairs(rows, resamples=args.resamples, seed=args.seed)
    ranking = ratings.bradley_terry(rows, resamples=args.resamples, seed=args.seed)
    text = (json.dumps({"pairs": pair_rows, "ranking": ranking}, indent=2) + "\n" if args.format == "json"
            else ratings.as_markdown(pair_rows, ranking))
    if args.output:
        votes.write_atomically(Path(args.output), text)
        print(f"wrote {args.output}")
    else:
        print(text, end="")
    return 0


def run_export(args) -> int:
    import time
    from pathlib import Path

    from hub.adapter import check_repo_id
    from ui import votes

    path = votes_database(args.votes)
    if args.push:
        check_repo_id(args.push)  # before anything is written
    folder = Path(args.output) if args.output else path.parent / "exports" / time.strftime("%Y%m%d-%H%M%S")
    selection = votes.Selection(args.adapter, args.revision)
    preferences, sft, rows = votes.export(path, folder, selection)
    print(f"{rows} decided votes ({selection.words()}): {preferences} (prompt, chosen, rejected) and {sft} "
          "(prompt, response)")
    if args.push:
        commit = votes.push([preferences, sft], args.push, args.registry, args.token,
                            message=f"loradock votes export: {rows} decided votes ({selection.words()})")
        print(f"pushed to dataset {args.push}")
        parent = f"{args.adapter}@{args.revision}" if args.adapter and args.revision else "REPO@REVISION"
        print(f"  train on it: loradock train --objective dpo --init-adapter {parent} "
              f"--data datasets/{args.push}@{commit}/{preferences.name}"
              f"  (or sft: --data datasets/{args.push}@{commit}/{sft.name})")
        print(f"commit {commit}")
    return 0


def is_local(host: str) -> bool:
    """Whether `host` is reachable from this machine only (localhost, 127.0.0.0/8, ::1)."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost, or an interface's address
        return False


def check_args(args: UIConfig) -> list[tuple[str, str]]:
    """Every problem with the flags, as (problem, fix)."""
    import socket

    problems = []
    if not is_local(args.host) and not args.password and not args.insecure_no_password:
        problems.append((f"--host {args.host} listens beyond this machine with no password, and whoever opens the "
                         "screen would use the endpoint with its API key",
                         "pass --password (or set LORADOCK_UI_PASSWORD) so each visitor must type it first; or "
                         "listen on --host 127.0.0.1; or pass --insecure-no-password when something else guards "
                         "the address"))
    if not args.base_url.startswith(("http://", "https://")):
        problems.append((f"--base-url {args.base_url!r} is not an http(s) URL",
                         f"pass e.g. --base-url {DEFAULT_ENDPOINT}"))
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

    from hub.client import TOKEN_ENV, endpoint_url
    from loradock.config import from_command_line, print_config
    from loradock.errors import LoradockError
    from loradock.home import home
    from loradock.procs import Service
    from ui import API_KEY_ENV, ENDPOINT_ENV, PAIRS_ENV, PASSWORD_ENV, REGISTRY_ENV, VOTES_ENV

    config = from_command_line(UIConfig, args, what="the UI configuration").args
    if getattr(args, "print_config", False):
        return print_config(config)
    config.password = config.password or os.environ.get(PASSWORD_ENV) or None
    problems = check_args(config)
    if problems:
        raise LoradockError("; ".join(p for p, _ in problems), "; ".join(f for _, f in problems))
    endpoint = config.base_url.rstrip("/")
    endpoint = endpoint if endpoint.endswith("/v1") else endpoint + "/v1"
    env = {**os.environ, ENDPOINT_ENV: endpoint, REGISTRY_ENV: endpoint_url(config.registry)}
    env.pop(PASSWORD_ENV, None)
    # Secrets reach the screen's process in its environment, never on its command line.
    for name, value in ((PASSWORD_ENV, config.password), (API_KEY_ENV, config.api_key), (TOKEN_ENV, config.token)):
        if value:
            env[name] = value
    if config.votes:
        env[VOTES_ENV] = str(Path(config.votes).resolve())
    if config.canary_pairs:
        env[PAIRS_ENV] = str(Path(config.canary_pairs).resolve())
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
        if not is_local(config.host) or config.password:
            print(access_line(config), flush=True)
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


def access_line(config: UIConfig) -> str:
    """Who can open the screen, for the start-up message (never the password itself)."""
    where = (f"listening on {config.host}:{config.port}, "
             + ("this machine only" if is_local(config.host) else "reachable beyond this machine"))
    if config.password:
        return f"{where}: access needs the password (--password / LORADOCK_UI_PASSWORD), asked before anything is shown"
    return f"{where}, with no password (--insecure-no-password): every visitor uses the endpoint and its API key"


def streamlit_command(host: str, port: int) -> list[str]:
    """`streamlit run ui/app.py` with the same Python, headless, without usage statistics or file watching."""
    import sys
    from pathlib import Path

    return [sys.executable, "-m", "streamlit", "run", str(Path(__file__).with_name("app.py")), "--server.headless",
            "true", "--server.address", host, "--server.port", str(port), "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal"]
