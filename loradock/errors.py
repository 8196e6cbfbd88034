"""The one error type a user sees: what is wrong, and what to do about it."""


class LoradockError(Exception):
    """A user-facing problem. The CLI prints it without a stack trace and exits with status 2.

    Args:
        problem: what is wrong, repeating the user's input.
        fix: what to do about it (the flag to change, the command to run).
        details: optional extra text printed after the two lines (a data report, a list of problems).
    """

    def __init__(self, problem: str, fix: str = "", details: str = ""):
        self.problem, self.fix, self.details = problem, fix, details
        super().__init__(self.message)

    @property
    def message(self) -> str:
        lines = [f"error: {self.problem}"]
        if self.fix:
            lines.append(f"fix: {self.fix}")
        if self.details:
            lines.append(self.details)
        return "\n".join(lines)


class NotFound(LoradockError):
    """The registry has no such repo or revision (or hides a private one from this caller)."""


class RepoNotFound(NotFound):
    pass


class RevisionNotFound(NotFound):
    pass


class Unreachable(LoradockError):
    """The registry (or another service) did not answer at all."""


class RegistryRefused(LoradockError):
    """The registry answered, and said no (a missing or read-only token, a race with another push).

    Args:
        status: the HTTP status it answered with.
    """

    def __init__(self, problem: str, fix: str = "", status: int | None = None):
        super().__init__(problem, fix)
        self.status = status


class AdapterRefused(LoradockError):
    """An adapter this server cannot serve, with every reason and what to do about each.

    Args:
        adapter: its name or folder name, as the user knows it.
        reasons: one sentence per problem, each naming the setting or the fix.
    """

    def __init__(self, adapter: str, reasons: list[str]):
        self.adapter, self.reasons = adapter, list(reasons)
        super().__init__(f"adapter {adapter} cannot be served here: " + "; ".join(self.reasons),
                         "change the adapter or the server setting named above")


class InvalidRequest(LoradockError):
    """A request a server will not carry out as sent (the client must change it)."""


class Forbidden(LoradockError):
    """A request a server understood and will not carry out on this server's policy (a 403)."""


class Busy(LoradockError):
    """A request that conflicts with work in progress and may succeed later (a 409)."""
