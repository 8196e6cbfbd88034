"""The registry's domain errors. The service raises them; only the web layer maps them to HTTP
status codes and the Hub's `X-Error-Code` header."""

import contextlib
import errno
import sqlite3
from collections.abc import Iterator

FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})  # no space left; the user's quota is used up


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


class WebhookNotFound(HubError):
    """The webhook does not exist, or belongs to another user."""


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


class InsufficientStorage(HubError):
    """The registry's disk (or its quota) is full: nothing of the request was stored."""


DISK_FULL = ("the registry's disk is full: nothing of this request was stored. Its operator must free space "
             "(`loradock hub gc` removes the files no commit references); then send the request again")


@contextlib.contextmanager
def refusing_a_full_disk() -> Iterator[None]:
    """Raise `InsufficientStorage` for a write the disk has no room for: an OSError of ENOSPC or
    EDQUOT, or SQLite's SQLITE_FULL (its extended codes included). Every other error passes as it
    is. Put it outside the code that cleans up after a failed write, so the cleanup runs first."""
    try:
        yield
    except OSError as e:
        if e.errno not in FULL_DISK_ERRNOS:
            raise
        raise InsufficientStorage(DISK_FULL) from e
    except sqlite3.Error as e:
        if (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF != sqlite3.SQLITE_FULL:
            raise
        raise InsufficientStorage(DISK_FULL) from e
