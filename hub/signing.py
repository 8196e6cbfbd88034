"""How the registry signs a webhook delivery, and how a subscriber checks one (`loradock serve`
calls `verify_delivery` on each POST the registry of `loradock hub serve` sends it).

A delivery carries three headers: `X-Loradock-Delivery` (an id, the same on every retry of it),
`X-Loradock-Timestamp` (unix seconds of this attempt) and, when the webhook has a secret,
`X-Loradock-Signature: sha256=<hex HMAC-SHA256(secret, b"{timestamp}.{delivery}." + body)>`. The
secret itself never travels. A subscriber refuses a delivery whose signature does not match, whose
timestamp is outside its window, or whose id it has seen already (a replay).

Client-side: this module imports no part of the registry's server.
"""

import hashlib
import hmac
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping

from loradock.errors import Forbidden

DELIVERY_HEADER = "X-Loradock-Delivery"
TIMESTAMP_HEADER = "X-Loradock-Timestamp"
SIGNATURE_HEADER = "X-Loradock-Signature"
FIX = "check that the webhook's secret here and in the registry are the same (`update_webhook(secret=...)`)"


def signature(secret: str, timestamp: str, delivery: str, body: bytes) -> str:
    """The `X-Loradock-Signature` value of a delivery: `sha256=` and the hex HMAC-SHA256 of
    `{timestamp}.{delivery}.` and the body, keyed by the webhook's secret."""
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}.{delivery}.".encode("utf-8") + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def signed_headers(secret: str | None, delivery: str, body: bytes, timestamp: int) -> dict[str, str]:
    """The headers of one delivery attempt (no signature without a secret)."""
    headers = {DELIVERY_HEADER: delivery, TIMESTAMP_HEADER: str(timestamp)}
    if secret:
        headers[SIGNATURE_HEADER] = signature(secret, str(timestamp), delivery, body)
    return headers


class SeenDeliveries:
    """The ids of the latest `size` deliveries accepted, to refuse a replay. An id older than the
    timestamp window has fallen out long before it could be replayed, if `size` exceeds the
    deliveries a subscriber receives in that window."""

    def __init__(self, size: int = 10_000):
        self.size, self._ids, self._lock = size, OrderedDict(), threading.Lock()

    def add(self, delivery: str) -> bool:
        """Remember `delivery`; False when it was seen already."""
        with self._lock:
            if delivery in self._ids:
                return False
            self._ids[delivery] = None
            while len(self._ids) > self.size:
                self._ids.popitem(last=False)
            return True


def verify_delivery(secret: str, headers: Mapping[str, str], body: bytes, seen: SeenDeliveries,
                    max_age_s: float = 300, now: float | None = None) -> None:
    """Accept a webhook delivery signed with `secret`, or refuse it; an accepted id goes into `seen`.

    Args:
        secret: the webhook's secret, as given to `create_webhook`.
        headers: the request's headers (any letter case).
        body: the request's body, exactly as received.
        seen: the ids accepted before (`SeenDeliveries`).
        max_age_s: how far, in seconds, the timestamp may be from `now`, either way.
        now: unix seconds (default: the clock).

    Raises:
        Forbidden: a header is missing, the signature does not match, the timestamp is too old or
            in the future, or the delivery was accepted before.
    """
    lower = {name.lower(): value for name, value in headers.items()}
    names = (DELIVERY_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)
    missing = [name for name in names if not lower.get(name.lower())]
    if missing:
        raise Forbidden(f"webhook delivery without {', '.join(missing)}: it was not signed by the registry",
                        "give the webhook a secret (`update_webhook(secret=...)`) so that its deliveries are signed")
    delivery, timestamp, given = (lower[name.lower()] for name in names)
    if not hmac.compare_digest(signature(secret, timestamp, delivery, body).encode(), given.encode("utf-8", "replace")):
        raise Forbidden(f"webhook delivery {delivery!r} has a signature that does not match its body", FIX)
    try:
        sent = int(timestamp)
    except ValueError:
        raise Forbidden(f"webhook delivery {delivery!r} has a timestamp {timestamp!r} that is not unix seconds") from None
    age = (time.time() if now is None else now) - sent
    if abs(age) > max_age_s:
        when = f"{age:.0f} s old" if age > 0 else f"{-age:.0f} s in the future"
        raise Forbidden(f"webhook delivery {delivery!r} is {when}, beyond the {max_age_s:g} s allowed",
                        "keep the clocks of the registry and this machine in sync (NTP)")
    if not seen.add(delivery):
        raise Forbidden(f"webhook delivery {delivery!r} was received before: a replay is refused",
                        "nothing to do: it was handled when it first came")
