"""Who may do what in the registry: users, organisations and their members, tokens, and the
access rules every route applies through `hub.storage.Registry`.

A namespace is a user or an organisation. A token belongs to a user and has a role: `read`
(reads what its user can read), `write` (also writes where its user can) or `admin` (the
registry's administrator: reads and writes everything). A user can read the public repos, the
repos of their own namespace and of every organisation they are a member of; they can write to
their own namespace and to the organisations where their membership is `write` or `admin`.
"""

from dataclasses import dataclass, field

TOKEN_ROLES = ("read", "write", "admin")
MEMBER_ROLES = ("read", "write", "admin")


@dataclass(frozen=True)
class Caller:
    """The user a request's token stands for, with the token's role and the user's organisations."""

    user: str
    role: str  # one of TOKEN_ROLES
    orgs: dict[str, str] = field(default_factory=dict, hash=False)  # organisation -> member role

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    @property
    def can_write(self) -> bool:
        return self.role in ("write", "admin")

    def reads(self, namespace: str) -> bool:
        """Whether the private repos of `namespace` are visible to this caller."""
        return self.admin or namespace == self.user or namespace in self.orgs

    def writes(self, namespace: str) -> bool:
        """Whether this caller may create and change repos in `namespace` (the token's role aside)."""
        return self.admin or namespace == self.user or self.orgs.get(namespace) in ("write", "admin")

    def readable_namespaces(self) -> list[str]:
        """The namespaces whose private repos this caller sees (all of them for an admin: see `admin`)."""
        return [self.user, *self.orgs]


def can_read(caller: Caller | None, namespace: str, private: bool) -> bool:
    return not private or (caller is not None and caller.reads(namespace))


def parse_member(spec: str) -> tuple[str, str]:
    """`NAME[:ROLE]` (`hub org add --member`) as (name, role); the role defaults to read.

    Raises:
        ValueError: the role is not one of MEMBER_ROLES.
    """
    name, _, role = spec.partition(":")
    role = role or "read"
    if role not in MEMBER_ROLES:
        raise ValueError(f"member role {role!r} of {name!r} must be one of {', '.join(MEMBER_ROLES)} (NAME:write)")
    return name, role
