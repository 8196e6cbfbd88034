"""The hub/ commands: `loradock push`, `pull`, `list` and `loradock hub serve|token|login|logout`."""

import contextlib
import functools
import getpass
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hub.gc import GRACE
from loradock.config import REGISTRY_HELP, TOKEN_HELP, add_config_flags, from_command_line, print_config, subcommand
from loradock.errors import LoradockError
from loradock.home import home



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


ROOT_HELP = "the registry's folder (none: $LORADOCK_HOME/registry); safe while `loradock hub serve` runs on it"


def registry_field():
    """--registry (once --endpoint), for a command that talks to a registry."""
    return field(default=None, metadata={"help": REGISTRY_HELP, "metavar": "URL", "was": ("endpoint",)})


def token_field():
    return field(default=None, metadata={"help": TOKEN_HELP, "secret": True})


@dataclass
class PushArgs:
    """Publish an adapter (or a base model) to a Hub registry in one commit."""

    folder: str | None = field(default=None, metadata={
        "help": "the --output folder of `loradock train` (or a model folder with --model)", "positional": True,
        "metavar": "ADAPTER_DIR", "required": True})
    repo_id: str | None = field(default=None, metadata={"help": "namespace/name", "positional": True,
                                                        "metavar": "REPO_ID", "required": True})
    tag: str | None = field(default=None, metadata={"help": "tag the new commit (e.g. v1); tags never move"})
    private: bool = field(default=False, metadata={
        "switch": True, "help": "create the repo private (visible with a token only)"})
    message: str | None = field(default=None, metadata={"help": "commit message"})
    model: bool = field(default=False, metadata={
        "switch": True, "help": "the folder is a base model (config.json + safetensors)"})
    max_file_size: int = field(default=5 * 2**30, metadata={"help": "refuse files larger than this many bytes"})
    registry: str | None = registry_field()
    token: str | None = token_field()


@dataclass
class PullArgs:
    """Download a pinned adapter snapshot and verify every file."""

    spec: str | None = field(default=None, metadata={
        "help": "revision: branch, tag or full 40-character sha (none: main)", "positional": True,
        "metavar": "REPO_ID[@REVISION]", "required": True})
    to: str | None = field(default=None, metadata={
        "help": "folder to put it in (none: $LORADOCK_HOME/pulled/REPO_ID/SHA)"})
    registry: str | None = registry_field()
    token: str | None = token_field()


@dataclass
class ListArgs:
    """The adapters in the registry, with base model, method, rank, tags, sha and metric."""

    base_model: str | None = field(default=None, metadata={"help": "only adapters of this base model"})
    search: str | None = field(default=None, metadata={"help": "only repo ids containing this text"})
    limit: int = field(default=50, metadata={"help": "at most this many, newest first"})
    registry: str | None = registry_field()
    token: str | None = token_field()


@dataclass
class LoginArgs:
    """Check a token against a registry and store it for that registry."""

    registry: str | None = registry_field()
    token: str | None = field(default=None, metadata={
        "help": "the token (asked for when missing; $LORADOCK_TOKEN works too, and $HF_TOKEN for huggingface.co or "
                "the Hub $HF_ENDPOINT names)", "secret": True})


@dataclass
class LogoutArgs:
    """Forget the stored token of a registry."""

    registry: str | None = registry_field()


@dataclass
class TokenCreateArgs:
    """Create a token (printed once) in the registry at --root."""

    user: str = field(default="loradock", metadata={"help": "the user it belongs to (added when missing)"})
    name: str = field(default="cli", metadata={"help": "a label for the token"})
    read_only: bool = field(default=False, metadata={
        "switch": True, "help": "reads what its user can read; writes nothing"})
    admin: bool = field(default=False, metadata={
        "switch": True, "help": "the registry's administrator: reads and writes every repo"})
    root: str | None = field(default=None, metadata={"help": ROOT_HELP})


@dataclass
class RootArgs:
    """The users and organisations of the registry at --root."""

    root: str | None = field(default=None, metadata={"help": ROOT_HELP})


@dataclass
class UserArgs:
    """One user of the registry at --root."""

    name: str | None = field(default=None, metadata={"help": "the user's name", "positional": True,
                                                     "metavar": "NAME", "required": True})
    root: str | None = field(default=None, metadata={"help": ROOT_HELP})


@dataclass
class OrgAddArgs:
    """Add an organisation, or add members to one."""

    name: str | None = field(default=None, metadata={"help": "the organisation", "positional": True, "metavar": "ORG",
                                                     "required": True})
    member: list[str] = field(default_factory=list, metadata={
        "help": "a user and their role: read (the default: sees private repos), write (also pushes), admin",
        "metavar": "NAME[:ROLE]"})
    root: str | None = field(default=None, metadata={"help": ROOT_HELP})


@dataclass
class OrgMemberArgs:
    """Take a user out of an organisation."""

    name: str | None = field(default=None, metadata={"help": "the organisation", "positional": True, "metavar": "ORG",
                                                     "required": True})
    user: str | None = field(default=None, metadata={"help": "the member", "positional": True, "metavar": "NAME",
                                                     "required": True})
    root: str | None = field(default=None, metadata={"help": ROOT_HELP})


@dataclass
class GcArgs:
    """Remove the blobs no commit references (safe while the registry serves)."""

    root: str | None = field(default=None, metadata={"help": ROOT_HELP})
    dry_run: bool = field(default=False, metadata={
        "switch": True, "help": "count what would be removed; delete nothing"})
    grace: float = field(default=GRACE, metadata={
        "help": "keep unreferenced blobs modified less than this many seconds ago: uploads whose commit may still "
                "come (an upload URL lives 3600)", "metavar": "SECONDS"})


def register(subparsers) -> None:
    subcommand(subparsers, "push", PushArgs, run_push, "push.yaml",
            help="publish an adapter (or a base model) to a Hub registry in one commit")
    subcommand(subparsers, "pull", PullArgs, run_pull, "pull.yaml",
            help="download a pinned adapter snapshot and verify every file")
    subcommand(subparsers, "list", ListArgs, run_list, "list.yaml",
            help="adapters in the registry, with base model, method, rank, tags, sha and metric")

    hub = subparsers.add_parser("hub", help="the embedded registry and your credentials")
    sub = hub.add_subparsers(dest="hub_command", metavar="SUBCOMMAND", required=True)
    serve = sub.add_parser("serve", help="run the embedded Hub-compatible registry")
    add_config_flags(serve, RegistryConfig, example="registry.yaml")
    serve.set_defaults(func=run_serve)

    token = sub.add_parser("token", help="registry tokens")
    token_sub = token.add_subparsers(dest="token_command", metavar="SUBCOMMAND", required=True)
    subcommand(token_sub, "create", TokenCreateArgs, run_token_create, "hub-token-create.yaml",
               validate=check_token_role,
            help="create a token (printed once) in the registry at --root")

    add_accounts(sub)
    subcommand(sub, "gc", GcArgs, run_gc, "hub-gc.yaml",
            help="remove the blobs no commit references (safe while the registry serves)")
    subcommand(sub, "login", LoginArgs, run_login, "hub-login.yaml",
            help="store a token for a registry (checked against it first)")
    subcommand(sub, "logout", LogoutArgs, run_logout, "hub-logout.yaml", help="forget the stored token of a registry")


def check_token_role(args: TokenCreateArgs) -> list[str]:
    return ["--read-only and --admin exclude each other: pass one of them, or neither for a write token"] \
        if args.read_only and args.admin else []


def add_accounts(sub) -> None:
    """`hub user ...` and `hub org ...`: who the registry knows, and who may write where."""
    user = sub.add_parser("user", help="the registry's users (each has a namespace of its own)")
    user_sub = user.add_subparsers(dest="user_command", metavar="SUBCOMMAND", required=True)
    subcommand(user_sub, "add", UserArgs, run_user_add, "hub-user-add.yaml", help="add a user")
    subcommand(user_sub, "remove", UserArgs, run_user_remove, "hub-user-remove.yaml",
            help="remove a user: its tokens stop working at once; its repos stay")
    subcommand(user_sub, "list", RootArgs, run_namespaces, "hub-user-list.yaml",
            help="users and organisations, with the members of each organisation")

    org = sub.add_parser("org", help="organisations: namespaces shared by their members")
    org_sub = org.add_subparsers(dest="org_command", metavar="SUBCOMMAND", required=True)
    subcommand(org_sub, "add", OrgAddArgs, run_org_add, "hub-org-add.yaml",
            help="add an organisation, or add members to one")
    subcommand(org_sub, "remove-member", OrgMemberArgs, run_org_remove_member, "hub-org-remove-member.yaml",
            help="take a user out of an organisation")
    subcommand(org_sub, "list", RootArgs, run_namespaces, "hub-org-list.yaml",
            help="users and organisations, with the members of each organisation")


def registry_root(root: str | None) -> Path:
    return Path(root) if root else home() / "registry"


def run_push(args) -> int:
    from hub.client import registry

    result = registry(args.registry, args.token).push(args.folder, args.repo_id, tag=args.tag, private=args.private,
                                                      message=args.message, model=args.model,
                                                      max_file_size=args.max_file_size)
    print(f"pushed {args.folder} to {result.url}" + (f" (tag {result.tag})" if result.tag else ""))
    print(f"commit {result.commit}")
    return 0


def run_pull(args) -> int:
    from hub.client import registry

    result = registry(args.registry, args.token).pull(args.spec, to=args.to)
    print(f"{result.repo_id}@{result.revision} is commit {result.commit}")
    print(f"verified and in {result.path}")
    return 0


def run_list(args) -> int:
    from hub.client import registry

    listed = registry(args.registry, args.token).list_adapters(args.base_model, args.search, args.limit)
    if not listed:
        print("no adapters" + (f" for base model {args.base_model}" if args.base_model else ""))
        return 0
    header = ("adapter", "base model", "method", "rank", "tags", "commit", "headline metric")
    table = [(a.repo_id + (" (private)" if a.private else ""), str(a.card.base_model), a.card.method or "-",
              str(a.card.rank or "-"), ",".join(a.tags) or "-", a.commit[:12],
              f"{a.card.headline.name} {a.card.headline.value}" if a.card.headline else "-") for a in listed]
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
        url = f"http://{config.host}:{config.port}"
        print(f"loradock registry at {url} (data in {root}); loradock's clients: LORADOCK_REGISTRY={url}, "
              f"other Hub clients: HF_ENDPOINT={url} HF_HUB_DISABLE_XET=1", flush=True)
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

    from hub.client import TOKEN_ENV, Registry, endpoint_url, is_hf_hub, save_token

    endpoint = endpoint_url(args.registry)
    hf_token = os.environ.get("HF_TOKEN") if is_hf_hub(endpoint) else None
    token = args.token or os.environ.get(TOKEN_ENV) or hf_token or getpass.getpass(f"token for {endpoint}: ")
    user = Registry(endpoint, token).whoami()
    save_token(endpoint, token)
    print(f"logged in to {endpoint} as {user}")
    return 0


def run_logout(args) -> int:
    from hub.client import endpoint_url, save_token

    endpoint = endpoint_url(args.registry)
    save_token(endpoint, None)
    print(f"logged out of {endpoint}")
    return 0
