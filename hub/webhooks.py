"""The registry's webhooks, as `loradock hub serve` keeps them: who watches what, checked and stored
in the registry's SQLite, which of them a moved ref concerns, and the Hub-shaped payload each one
gets (`hub.delivery` sends it; `hub.routes.webhooks` serves huggingface_hub's `*_webhook` calls).

A webhook belongs to the user whose token created it; only they see or change it. It watches
users, organisations (every repo of that namespace), models and datasets by name, and is told of
the `repo` domain only: a commit to a branch, a branch or tag created or deleted. A webhook is
never told of a repo its owner cannot read.

No web imports: errors are those of `hub.errors`.
"""

import ipaddress
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from hub.accounts import Caller, can_read
from hub.errors import BadRequest, NotSupported, Unauthorized, WebhookNotFound
from hub.storage import Registry, RefMoved, Repo, is_name, now

SCHEMA = """
CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, url TEXT NOT NULL, watched TEXT NOT NULL, domains TEXT NOT NULL,
    secret TEXT, disabled INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id INTEGER PRIMARY KEY, webhook_id TEXT NOT NULL, delivery TEXT NOT NULL, event TEXT NOT NULL,
    attempt INTEGER NOT NULL, status INTEGER, error TEXT, at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS webhooks_by_owner ON webhooks (owner);
CREATE INDEX IF NOT EXISTS webhook_deliveries_by_webhook ON webhook_deliveries (webhook_id, id);
"""
WATCH_TYPES = ("user", "org", "model", "dataset")
DOMAINS = ("repo", "discussion")  # both accepted, as the Hub's client sends both by default; only repo events exist here
MAX_WATCHED, MAX_URL, MAX_SECRET = 100, 2048, 256
KEPT_DELIVERIES = 200  # log rows kept per webhook, the newest
ID_LENGTH = 24  # hex characters, as the Hub's ids


@dataclass(frozen=True)
class Watched:
    type: str  # one of WATCH_TYPES
    name: str  # a user or organisation, or namespace/name of a repo


@dataclass(frozen=True)
class Webhook:
    id: str
    owner: str
    url: str
    watched: tuple[Watched, ...]
    domains: tuple[str, ...]
    secret: str | None
    disabled: bool

    def watches(self, repo: Repo) -> bool:
        """Whether an event of `repo` is for this webhook (its owner's right to read aside)."""
        return "repo" in self.domains and any(
            (w.type in ("user", "org") and w.name == repo.namespace) or (w.type == repo.type and w.name == repo.repo_id)
            for w in self.watched)


@dataclass(frozen=True)
class Attempt:
    """One attempt at one delivery, as the delivery log keeps it."""

    delivery: str
    event: str  # e.g. repo.content.update
    attempt: int  # 1 for the first
    status: int | None  # the subscriber's HTTP status; None when it did not answer
    error: str | None
    at: str


@dataclass(frozen=True)
class Settings:
    """What a create or update request asks for, checked (`check_settings`); None: unchanged."""

    url: str | None = None
    watched: tuple[Watched, ...] | None = None
    domains: tuple[str, ...] | None = None
    secret: str | None = None  # "" removes the secret


def migrate(db) -> None:
    """Add the webhook tables to a registry made before them, in the open transaction."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)


class Webhooks:
    """The webhooks of one registry, stored beside its repos."""

    def __init__(self, registry: Registry):
        self.registry = registry
        with registry.database(write=True) as db:
            migrate(db)

    def create(self, caller: Caller | None, settings: Settings) -> Webhook:
        """A new webhook of the caller's, with the settings `check_settings(..., creating=True)` gave."""
        owner = self.registry.require_write(caller).user
        webhook = Webhook(secrets.token_hex(ID_LENGTH // 2), owner, settings.url, settings.watched,
                          settings.domains or DOMAINS, settings.secret or None, False)
        with self.registry.database(write=True) as db:
            db.execute("INSERT INTO webhooks VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                       (webhook.id, owner, webhook.url, _watched_json(webhook.watched), json.dumps(webhook.domains),
                        webhook.secret, now()))
        return webhook

    def owned(self, caller: Caller | None) -> list[Webhook]:
        """The caller's webhooks, oldest first."""
        owner = _signed_in(caller)
        with self.registry.database() as db:
            rows = db.execute("SELECT * FROM webhooks WHERE owner = ? ORDER BY created_at, id", (owner,)).fetchall()
        return [_webhook(row) for row in rows]

    def get(self, caller: Caller | None, webhook_id: str) -> Webhook:
        """The caller's webhook of that id.

        Raises:
            WebhookNotFound: there is none, or it is someone else's.
        """
        owner = _signed_in(caller)
        with self.registry.database() as db:
            row = db.execute("SELECT * FROM webhooks WHERE id = ? AND owner = ?", (webhook_id, owner)).fetchone()
        if row is None:
            raise WebhookNotFound(f"webhook {webhook_id} not found among the webhooks of {owner} (see `list_webhooks`)")
        return _webhook(row)

    def update(self, caller: Caller | None, webhook_id: str, settings: Settings) -> Webhook:
        """Change what `settings` gives (None: unchanged; an empty secret removes the secret)."""
        self.get(self.registry.require_write(caller), webhook_id)
        changes = {}
        if settings.url is not None:
            changes["url"] = settings.url
        if settings.watched:
            changes["watched"] = _watched_json(settings.watched)
        if settings.domains is not None:
            changes["domains"] = json.dumps(settings.domains)
        if settings.secret is not None:
            changes["secret"] = settings.secret or None
        if changes:
            with self.registry.database(write=True) as db:
                db.execute(f"UPDATE webhooks SET {', '.join(f'{column} = ?' for column in changes)} WHERE id = ?",
                           [*changes.values(), webhook_id])
        return self.get(caller, webhook_id)

    def set_disabled(self, caller: Caller | None, webhook_id: str, disabled: bool) -> Webhook:
        self.get(self.registry.require_write(caller), webhook_id)
        with self.registry.database(write=True) as db:
            db.execute("UPDATE webhooks SET disabled = ? WHERE id = ?", (int(disabled), webhook_id))
        return self.get(caller, webhook_id)

    def delete(self, caller: Caller | None, webhook_id: str) -> None:
        self.get(self.registry.require_write(caller), webhook_id)
        with self.registry.database(write=True) as db:
            db.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,))
            db.execute("DELETE FROM webhook_deliveries WHERE webhook_id = ?", (webhook_id,))

    def attempts(self, caller: Caller | None, webhook_id: str) -> list[Attempt]:
        """The delivery log of the caller's webhook, newest first (the latest KEPT_DELIVERIES attempts)."""
        self.get(caller, webhook_id)
        with self.registry.database() as db:
            rows = db.execute("SELECT * FROM webhook_deliveries WHERE webhook_id = ? ORDER BY id DESC",
                              (webhook_id,)).fetchall()
        return [Attempt(r["delivery"], r["event"], r["attempt"], r["status"], r["error"], r["at"]) for r in rows]

    # --- what the delivery worker asks --------------------------------------------------------

    def active(self, webhook_id: str) -> Webhook | None:
        """The webhook as it is now, if it still exists, is enabled and its owner is still a user."""
        with self.registry.database() as db:
            row = db.execute("SELECT w.* FROM webhooks w JOIN namespaces n ON n.name = w.owner AND n.kind = 'user' "
                             "WHERE w.id = ? AND w.disabled = 0", (webhook_id,)).fetchone()
        return _webhook(row) if row else None

    def concerned(self, event: RefMoved) -> list[Webhook]:
        """The enabled webhooks that watch the repo of `event` and whose owner may read it."""
        with self.registry.database() as db:
            rows = db.execute("SELECT w.* FROM webhooks w JOIN namespaces n ON n.name = w.owner AND n.kind = 'user' "
                              "WHERE w.disabled = 0 ORDER BY w.id").fetchall()
            hooks = [hook for hook in map(_webhook, rows) if hook.watches(event.repo)]
            if not hooks:
                return []
            memberships = db.execute(f"SELECT user, org, role FROM members WHERE user IN "
                                     f"({', '.join('?' * len(hooks))})", [h.owner for h in hooks]).fetchall()
        orgs: dict[str, dict[str, str]] = {}
        for row in memberships:
            orgs.setdefault(row["user"], {})[row["org"]] = row["role"]
        repo = event.repo
        return [hook for hook in hooks
                if can_read(Caller(hook.owner, "read", orgs.get(hook.owner, {})), repo.namespace, repo.private)]

    def log(self, webhook_id: str, attempt: Attempt) -> None:
        """Add one attempt to the delivery log, keeping the newest KEPT_DELIVERIES of the webhook."""
        with self.registry.database(write=True) as db:
            db.execute("INSERT INTO webhook_deliveries (webhook_id, delivery, event, attempt, status, error, at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", (webhook_id, attempt.delivery, attempt.event, attempt.attempt,
                                                        attempt.status, attempt.error, attempt.at))
            db.execute("DELETE FROM webhook_deliveries WHERE webhook_id = ? AND id <= (SELECT id FROM webhook_deliveries "
                       "WHERE webhook_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)", (webhook_id, webhook_id, KEPT_DELIVERIES))


def payload(webhook: Webhook, event: RefMoved, head: str | None) -> dict:
    """The Hub's webhook payload for a moved ref (`head`: the head of main now)."""
    repo = event.repo
    return {"event": {"action": event.action, "scope": "repo.content"},
            "repo": {"type": repo.type, "name": repo.repo_id, "id": str(repo.id), "private": repo.private,
                     "headSha": head},
            "updatedRefs": [{"ref": event.ref, "oldSha": event.old, "newSha": event.new}],
            "webhook": {"id": webhook.id, "version": 3}}


# --- checking a request -----------------------------------------------------------------------

def check_settings(url: str | None, watched: list[dict] | None, domains: list[str] | None, secret: str | None,
                   registry_addresses: Iterable[tuple[str, int]], creating: bool) -> Settings:
    """The settings of a create (`creating`) or update request, every problem named at once. An
    update leaves what is None as it is, and so an empty `watched`: huggingface_hub's
    `update_webhook` sends `watched: []` when it is not given.

    Args:
        registry_addresses: (host, port) pairs the registry answers on; a URL to one of them (or to a
            loopback alias on one of their ports) is refused: the registry would call itself.

    Raises:
        BadRequest: each problem of the url, watched items, domains or secret, with its fix.
    """
    checks = {"url": lambda: check_url(url, registry_addresses, creating),
              "watched": lambda: check_watched(watched, creating), "domains": lambda: check_domains(domains),
              "secret": lambda: check_secret(secret)}
    checked, problems = {}, []
    for field, check in checks.items():
        try:
            checked[field] = check()
        except BadRequest as e:
            problems.append(e.message)
    if problems:
        raise BadRequest("; ".join(problems))
    return Settings(**checked)


def check_url(url: str | None, registry_addresses: Iterable[tuple[str, int]], required: bool) -> str | None:
    if url is None:
        if required:
            raise BadRequest("a webhook needs a url: create_webhook(url='http://HOST:PORT/PATH', watched=[...])")
        return None
    if len(url) > MAX_URL or any(c <= " " or c == "\x7f" or not c.isascii() for c in url):
        raise BadRequest(f"webhook url {url[:100]!r} is over {MAX_URL} characters or holds a space, control or non-ASCII "
                         "character: percent-encode the URL")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise BadRequest(f"webhook url {url!r} cannot be parsed ({e}): give one such as http://HOST:PORT/PATH") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"webhook url {url!r} is not an http(s) URL: give one such as http://HOST:PORT/PATH")
    own = {(_host_key(host), p) for host, p in registry_addresses}
    host = _host_key(parts.hostname)
    if (host, port) in own or (host == "loopback" and port in {p for _, p in own}):
        raise BadRequest(f"webhook url {url!r} points at this registry itself: give the address of the subscriber "
                         "(the `loradock serve` that is to be told), not the registry's")
    return url


def check_watched(watched: list[dict] | None, required: bool) -> tuple[Watched, ...] | None:
    if not watched:
        if required:
            raise BadRequest("a webhook must watch something: give watched=[{'type': 'user', 'name': 'alice'}] "
                             f"(types: {', '.join(WATCH_TYPES)})")
        return None
    if len(watched) > MAX_WATCHED:
        raise BadRequest(f"a webhook watches at most {MAX_WATCHED} items, not {len(watched)}: watch a user or "
                         "organisation instead of each of its repos")
    out = []
    for item in watched:
        kind, name = item.get("type"), item.get("name")
        if kind not in WATCH_TYPES:
            raise BadRequest(f"watched item {item!r} has type {kind!r}: use one of {', '.join(WATCH_TYPES)} (this "
                             "registry stores model and dataset repos)")
        parts = name.split("/") if isinstance(name, str) else [None]
        if len(parts) != (1 if kind in ("user", "org") else 2) or not all(is_name(p) for p in parts):
            form = "a user or organisation name" if kind in ("user", "org") else "namespace/name of a repo"
            raise BadRequest(f"watched {kind} {name!r} is not {form}: use letters, digits, '-', '_', '.' "
                             f"(e.g. {'alice' if kind in ('user', 'org') else 'alice/my-adapter'})")
        out.append(Watched(kind, name))
    return tuple(dict.fromkeys(out))


def check_domains(domains: list[str] | None) -> tuple[str, ...] | None:
    if domains is None:
        return None
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains:
        raise BadRequest(f"webhook domains {domains!r}: use a non-empty list of {', '.join(DOMAINS)} (only repo "
                         "events are sent by this registry)")
    return tuple(dict.fromkeys(domains))


def check_secret(secret: str | None) -> str | None:
    if secret is not None and len(secret) > MAX_SECRET:
        raise BadRequest(f"the webhook secret is {len(secret)} characters long: use at most {MAX_SECRET} "
                         "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)")
    return secret


def refuse_jobs(job_source: str | None) -> None:
    if job_source is not None:
        raise NotSupported("webhooks that start Jobs are not supported by this registry: give a url to POST to")


def _signed_in(caller: Caller | None) -> str:
    if caller is None:
        raise Unauthorized("webhooks belong to a user: send a token (create one with `loradock hub token create`)")
    return caller.user


def _host_key(host: str) -> str:
    """A host as compared with the registry's own: every loopback or unspecified address (and
    `localhost`) is one, since a registry bound to any of them answers on loopback."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return "loopback"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return "loopback" if address.is_loopback or address.is_unspecified else str(address)


def _watched_json(watched: tuple[Watched, ...]) -> str:
    return json.dumps([{"type": w.type, "name": w.name} for w in watched])


def _webhook(row) -> Webhook:
    watched = tuple(Watched(item["type"], item["name"]) for item in json.loads(row["watched"]))
    return Webhook(row["id"], row["owner"], row["url"], watched, tuple(json.loads(row["domains"])), row["secret"],
                   bool(row["disabled"]))
