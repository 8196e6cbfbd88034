"""The registry's domain errors. The service raises them; only the web layer maps them to HTTP
status codes and the Hub's `X-Error-Code` header."""


class HubError(Exception):
    """Base class; `message` is safe to show to the client (never contains a token)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class RepoNotFound(HubError):
    """The repo does not exist, or the caller may not see it (private)."""


class RevisionNotFound(HubError):
    pass


class EntryNotFound(HubError):
    pass


class BadRequest(HubError):
    """Malformed or invalid input: the caller must change the request."""


class Unauthorized(HubError):
    """No token where one is needed, or a token this registry does not know."""


class Forbidden(HubError):
    """A known token without the right: a read-only token writing, or a user writing where they
    are not a member with write access."""


class Conflict(HubError):
    """The thing already exists (repo, tag)."""


class PreconditionFailed(HubError):
    """The commit's parent is not the branch head any more: someone pushed in between."""


class TooLarge(HubError):
    pass


class NotSupported(HubError):
    """A part of the Hub API this registry does not implement (Xet, pull requests, Spaces...);
    the message says what to do instead."""
