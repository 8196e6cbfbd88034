"""The hub/ commands: `loradock push`, `pull`, `list` and `loradock hub serve|token|login|logout`."""

import contextlib
import functools
import getpass
import sys
from dataclasses import dataclass, field
from pathlib import Path

from loradock.config import add_config_flags, from_command_line, print_config
from loradock.errors import LoradockError
from loradock.home import home

ENDPOINT_HELP = "registry URL (default: $HF_ENDPOINT, else the embedded registry http://127.0.0.1:8090)"


@dataclass
class RegistryConfig:
    """What `loradock hub serve` runs: the embedded registry's address and storage."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8090, metadata={"help": "port to listen on"})
    root: str | None = field(default=None, metadata={"help": "where repos live (none: $LORADOCK_HOME/registry)"})
    max_file_size: int = field(default=5 * 2**30, metadata={"help": "largest file it accepts, in bytes"})
    header_timeout: float = field(default=10.0, metadata={
        "help": "seconds a request's headers may take to arrive; a slower client is answered 408 and disconnected"})
    body_idle_timeout: float = field(default=30.0, metadata={
        "help": "seconds a request's body may pause (a long upload is fine while it moves); then 408, disconnected"})


def check_registry_config(config: RegistryConfig) -> list[str]:
    problems = []
    if not 0 < config.port < 65536:
        problems.append(f"--port {config.port} is not a TCP port; pass --port from 1 to 65535")
    if config.max_file_size < 1:
        problems.append(f"--max-file-size {config.max_file_size} must be a positive number of bytes")
    for flag, seconds in (("--header-timeout", config.header_timeout),
                          ("--body-idle-timeout", config.body_idle_timeout)):
        if not seconds > 0:
            problems.append(f"{flag} {seconds} must be a positive number of seconds")
    return problems


def register(subparsers) -> None:
    p = subparsers.add_parser("push", help="publish an adapter (or a base model) to a Hub registry in one commit")
    p.add_argument("folder", metavar="ADAPTER_DIR", help="the --output folder of `loradock train` (or a model with --model)")
    p.add_argument("repo_id", metavar="REPO_ID", help="namespace/name")
    p.add_argument("--tag", help="tag the new commit (e.g. v1); tags never move")
    p.add_argument("--private", action="store_true", help="create the repo private (visible with a token only)")
    p.add_argument("--message", help="commit message")
    p.add_argument("--model", action="store_true", help="the folder is a base model (config.json + safetensors)")
    p.add_argument("--max-file-size", type=int, default=5 * 2**30, help="refuse files larger than this many bytes")
    add_remote(p)
    p.set_defaults(func=run_push)

    p = subparsers.add_parser("pull", help="download a pinned adapter snapshot and verify every file")
    p.add_argument("spec", metavar="REPO_ID[@REVISION]", help="revision: branch, tag or full 40-character sha (default main)")
    p.add_argument("--to", help="folder to put it in (default: $LORADOCK_HOME/pulled/REPO_ID/SHA)")
    add_remote(p)
    p.set_defaults(func=run_pull)

    p = subparsers.add_parser("list", help="adapters in the registry, with base model, method, rank, tags, sha and metric")
    p.add_argument("--base-model", help="only adapters of this base model")
    p.add_argument("--search", help="only repo ids containing this text")
    p.add_argument("--limit", type=int, default=50, help="at most this many, newest first (default 50)")
    add_remote(p)
    p.set_defaults(func=run_list)

    hub = subparsers.add_parser("hub", help="the embedded registry and your credentials")
    sub = hub.add_subparsers(dest="hub_command", metavar="SUBCOMMAND", required=True)
    serve = sub.add_parser("serve", help="run the embedded Hub-compatible registry")
    add_config_flags(serve, RegistryConfig, example="registry.yaml")
    serve.set_defaults(func=run_serve)

    token = sub.add_parser("token", help="registry tokens")
    token_sub = token.add_subparsers(dest="token_command", metavar="SUBCOMMAND", required=True)
    create = token_sub.add_parser("create", help="create a token (printed once) in the registry at --root")
    create.add_argument("--user", default="loradock", help="the user it belongs to (added when missing)")
    create.add_argument("--name", default="cli", help="a label for the token")
    role = create.add_mutually_exclusive_group()
    role.add_argument("--read-only", action="store_true", help="reads what its user can read; writes nothing")
    role.add_argument("--admin", action="store_true", help="the registry's administrator: reads and writes every repo")
    add_root(create)
    create.set_defaults(func=run_token_create)

    add_accounts(sub)
    add_gc(sub)

    login = sub.add_parser("login", help="store a token for an endpoint (checked against it first)")
    login.add_argument("--token", help="the token (asked for when missing; HF_TOKEN works too)")
    login.add_argument("--endpoint", help=ENDPOINT_HELP)
    login.set_defaults(func=run_login)
    logout = sub.add_parser("logout", help="forget the stored token of an endpoint")
    logout.add_argument("--endpoint", help=ENDPOINT_HELP)
    logout.set_defaults(func=run_logout)


def add_accounts(sub) -> None:
    """`hub user ...` and `hub org ...`: who the registry knows, and who may write where."""
    user = sub.add_parser("user", help="the registry's users (each has a namespace of its own)")
    user_sub = user.add_subparsers(dest="user_command", metavar="SUBCOMMAND", required=True)
    p = user_sub.add_parser("add", help="add a user")
    p.add_argument("name", metavar="NAME")
    add_root(p)
    p.set_defaults(func=run_user_add)
    p = user_sub.add_parser("remove", help="remove a user: its tokens stop working at once; its repos stay")
    p.add_argument("name", metavar="NAME")
    add_root(p)
    p.set_defaults(func=run_user_remove)
    p = user_sub.add_parser("list", help="users and organisations, with the members of each organisation")
    add_root(p)
    p.set_defaults(func=run_namespaces)

    org = sub.add_parser("org", help="organisations: namespaces shared by their members")
    org_sub = org.add_subparsers(dest="org_command", metavar="SUBCOMMAND", required=True)
    p = org_sub.add_parser("add", help="add an organisation, or add members to one")
    p.add_argument("name", metavar="ORG")
    p.add_argument("--member", action="append", default=[], metavar="NAME[:ROLE]",
                   help="a user and their role: read (default: sees private repos), write (also pushes), admin")
    add_root(p)
    p.set_defaults(func=run_org_add)
    p = org_sub.add_parser("remove-member", help="take a user out of an organisation")
    p.add_argument("name", metavar="ORG")
    p.add_argument("user", metavar="NAME")
    add_root(p)
    p.set_defaults(func=run_org_remove_member)
    p = org_sub.add_parser("list", help="users and organisations, with the members of each organisation")
    add_root(p)
    p.set_defaults(func=run_namespaces)


def add_root(p) -> None:
    p.add_argument("--root", help="the registry's folder (default: $LORADOCK_HOME/registry); "
                                  "safe while `loradock hub serve` runs on it")


def add_gc(sub) -> None:
    """`loradock hub gc`, under `sub` (the `hub` subcommands)."""
    from hub.gc import GRACE

    gc = sub.add_parser("gc", help="remove the blobs no commit references (safe while the registry serves)")
    gc.add_argument("--root", help="the registry's folder (default: $LORADOCK_HOME/registry)")
    gc.add_argument("--dry-run", action="store_true", help="count what would be removed; delete nothing")
    gc.add_argument("--grace", type=float, default=GRACE, metavar="SECONDS",
                    help="keep unreferenced blobs modified less than this long ago: uploads whose commit may "
                         f"still come (default {GRACE}; an upload URL lives 3600)")
    gc.set_defaults(func=run_gc)


def add_remote(p) -> None:
    p.add_argument("--endpoint", help=ENDPOINT_HELP)
    p.add_argument("--token", help="token for the registry (default: HF_TOKEN, else `loradock hub login`'s)")


def registry_root(root: str | None) -> Path:
    return Path(root) if root else home() / "registry"


def run_push(args) -> int:
    from hub.client import push

    result = push(args.folder, args.repo_id, tag=args.tag, private=args.private, message=args.message,
                  endpoint=args.endpoint, token=args.token, model=args.model, max_file_size=args.max_file_size)
    print(f"pushed {args.folder} to {result.url}" + (f" (tag {result.tag})" if result.tag else ""))
    print(f"commit {result.commit}")
    return 0


def run_pull(args) -> int:
    from hub.client import pull

    result = pull(args.spec, to=args.to, endpoint=args.endpoint, token=args.token)
    print(f"{result.repo_id}@{result.revision} is commit {result.commit}")
    print(f"verified and in {result.path}")
    return 0


def run_list(args) -> int:
    from hub.client import list_adapters

    rows = list_adapters(args.base_model, args.search, args.endpoint, args.token, args.limit)
    if not rows:
        print("no adapters" + (f" for base model {args.base_model}" if args.base_model else ""))
        return 0
    header = ("adapter", "base model", "method", "rank", "tags", "commit", "headline metric")
    table = [(r["repo_id"] + (" (private)" if r["private"] else ""), str(r["base_model"]), r["method"] or "-",
              str(r["rank"] or "-"),
              ",".join(r["tags"]) or "-", r["sha"][:12], r["metric"] or "-") for r in rows]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def run_serve(args) -> int:
    import uvicorn

    from hub.blobs import serve_lock
    from hub.server import create_app
    from hub.slow_clients import BoundedHeaderRead
    from hub.storage import Registry

    config = from_command_line(RegistryConfig, args, what="the registry configuration",
                               validate=lambda r: check_registry_config(r.args)).args
    if getattr(args, "print_config", False):
        return print_config(config)
    root = registry_root(config.root)
    with serve_lock(root) as cleaned:
        registry = Registry(root, max_file_size=config.max_file_size)
        print(f"loradock registry at http://{config.host}:{config.port} (data in {root}); "
              f"clients: HF_ENDPOINT=http://{config.host}:{config.port}", flush=True)
        if not cleaned:
            print(f"another `loradock hub serve` is using {root}: its tmp/ (uploads in flight) is left as it is",
                  flush=True)
        uvicorn.run(create_app(registry, body_idle_timeout=config.body_idle_timeout), host=config.host,
                    port=config.port, log_level="warning",
                    http=functools.partial(BoundedHeaderRead, header_timeout=config.header_timeout))
    return 0


@contextlib.contextmanager
def administration(root: str | None, help_command: str):
    """The registry at `root` for a `hub` administration command; its errors as loradock's."""
    from hub.errors import HubError
    from hub.storage import Registry

    path = registry_root(root)
    if not (path / "registry.sqlite").exists() and help_command in ("user remove", "user list", "org remove-member"):
        raise LoradockError(f"there is no registry at {path}", "pass --root, the folder `loradock hub serve` uses")
    try:
        yield Registry(path)
    except HubError as e:
        raise LoradockError(e.message, f"see `loradock hub {help_command} --help`") from None


def run_token_create(args) -> int:
    role = "admin" if args.admin else "read" if args.read_only else "write"
    with administration(args.root, "token create") as registry:
        token = registry.create_token(args.name, args.user, role)
    print(token)
    kind = {"read": "read-only", "write": "write", "admin": "admin"}[role]
    print(f"(a {kind} token for {args.user}; it is shown only now)", file=sys.stderr)
    return 0


def run_user_add(args) -> int:
    with administration(args.root, "user add") as registry:
        added = registry.add_user(args.name)
    print(f"user {args.name} {'added' if added else 'already exists'}")
    return 0


def run_user_remove(args) -> int:
    with administration(args.root, "user remove") as registry:
        revoked = registry.remove_user(args.name)
    print(f"user {args.name} removed; {revoked} token(s) revoked; its repos stay")
    return 0


def run_org_add(args) -> int:
    from hub.accounts import parse_member

    try:
        members = [parse_member(spec) for spec in args.member]
    except ValueError as e:
        raise LoradockError(str(e), "pass --member NAME:read, NAME:write or NAME:admin") from None
    with administration(args.root, "org add") as registry:
        added = registry.add_org(args.name, members)
    print(f"organisation {args.name} {'added' if added else 'exists'}"
          + "".join(f"; {user} is a {role} member" for user, role in members))
    return 0


def run_org_remove_member(args) -> int:
    with administration(args.root, "org remove-member") as registry:
        registry.remove_member(args.name, args.user)
    print(f"{args.user} is no longer a member of {args.name}")
    return 0


def run_namespaces(args) -> int:
    with administration(args.root, "user list") as registry:
        namespaces = registry.namespaces()
    for ns in namespaces:
        members = ", ".join(f"{user}:{role}" for user, role in ns["members"].items())
        print(f"{ns['kind']:4}  {ns['name']}" + (f"  members: {members}" if ns["kind"] == "org" else ""))
    return 0


def run_gc(args) -> int:
    from hub.gc import collect, describe

    if not args.grace >= 0:
        raise LoradockError(f"--grace {args.grace:g} is not a number of seconds", "pass --grace 0 or more")
    report = collect(registry_root(args.root), grace=args.grace, dry_run=args.dry_run)
    print("\n".join(describe(report, args.grace)))
    return 0


def run_login(args) -> int:
    import os

    from hub.client import endpoint_url, hub_api, hub_errors, save_token

    endpoint = endpoint_url(args.endpoint)
    token = args.token or os.environ.get("HF_TOKEN") or getpass.getpass(f"token for {endpoint}: ")
    with hub_errors(endpoint, "(login)"):
        user = hub_api(endpoint, token).whoami()["name"]
    save_token(endpoint, token)
    print(f"logged in to {endpoint} as {user}")
    return 0


def run_logout(args) -> int:
    from hub.client import endpoint_url, save_token

    endpoint = endpoint_url(args.endpoint)
    save_token(endpoint, None)
    print(f"logged out of {endpoint}")
    return 0
