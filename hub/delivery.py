"""The registry's webhook delivery worker, started and stopped with `loradock hub serve`'s app.

A moved ref (`hub.storage.RefMoved`) is queued by the request that moved it, once its transaction
committed, and the request goes on: nothing here runs on a request's thread. One dispatcher thread
finds the webhooks it concerns (`hub.webhooks.Webhooks.concerned`) and hands one delivery per
webhook to that webhook's lane: a thread of its own, started when it has work and ended when it has
none, that sends its deliveries in order (a tag moved by delete then create arrives as such). So a
subscriber that hangs holds up its own deliveries only.

Each attempt is a signed POST (`hub.signing`) with a timeout; a connection error or a 5xx is tried
again after BACKOFF seconds, up to len(BACKOFF) + 1 attempts; any other answer is final (redirects
are not followed). Every attempt goes into the delivery log. Deliveries still queued when the
registry stops are dropped: they are not kept across restarts.
"""

import http.client
import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

from hub import errors
from hub.signing import signed_headers
from hub.storage import RefMoved, now
from hub.webhooks import Attempt, Webhook, Webhooks, payload

BACKOFF = (1, 2, 4, 8)  # seconds before the 2nd, 3rd, ... attempt
TIMEOUT = 5.0  # seconds for each step of one attempt (connect, send, each read)
MAX_PENDING = 1000  # deliveries one webhook's lane holds; more are dropped (and logged)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One delivery to one webhook: the same id and body on every attempt."""

    webhook_id: str
    delivery: str
    event: str  # e.g. repo.content.update
    body: bytes


class Deliveries:
    """Delivers the webhooks of `webhooks` while started (`start`, `stop`)."""

    def __init__(self, webhooks: Webhooks, timeout: float = TIMEOUT, backoff: tuple[float, ...] = BACKOFF):
        self.webhooks, self.timeout, self.backoff = webhooks, timeout, backoff
        self._events: queue.SimpleQueue[RefMoved | None] = queue.SimpleQueue()
        self._lanes: dict[str, deque[Job]] = {}  # webhook id -> its pending jobs, while its thread runs
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._dispatcher: threading.Thread | None = None

    def start(self) -> None:
        """Listen to the registry's moved refs and deliver them."""
        self._stopping.clear()
        self._dispatcher = threading.Thread(target=self._dispatch, name="webhook-dispatcher", daemon=True)
        self._dispatcher.start()
        self.webhooks.registry.ref_listeners.append(self.announce)

    def stop(self, wait: float = 2.0) -> None:
        """Stop listening and delivering: an attempt in flight ends within `timeout`; the dispatcher is
        waited for at most `wait` seconds, the lanes not at all (their threads are daemons)."""
        listeners = self.webhooks.registry.ref_listeners
        if self.announce in listeners:
            listeners.remove(self.announce)
        self._stopping.set()
        self._events.put(None)
        if self._dispatcher is not None:
            self._dispatcher.join(wait)

    def announce(self, event: RefMoved) -> None:
        """A registry listener: queue the event and return at once."""
        self._events.put(event)

    def _dispatch(self) -> None:
        while (event := self._events.get()) is not None:
            try:
                self._fan_out(event)
            except Exception:  # one event's failure (a database error) must not stop the worker
                log.exception("webhooks of %s %s of %s not delivered", event.action, event.ref, event.repo.repo_id)

    def _fan_out(self, event: RefMoved) -> None:
        hooks = self.webhooks.concerned(event)
        if not hooks:
            return
        try:
            head = self.webhooks.registry.resolve(event.repo, "refs/heads/main").oid
        except errors.HubError:  # the repo is gone since
            head = None
        for hook in hooks:
            body = json.dumps(payload(hook, event, head), separators=(",", ":")).encode()
            self._submit(Job(hook.id, uuid.uuid4().hex, f"repo.content.{event.action}", body))

    def _submit(self, job: Job) -> None:
        with self._lock:
            lane = self._lanes.get(job.webhook_id)
            if lane is not None and len(lane) >= MAX_PENDING:
                dropped = True
            else:
                dropped = False
                if lane is None:
                    lane = self._lanes[job.webhook_id] = deque()
                    threading.Thread(target=self._drain, args=(job.webhook_id,), name=f"webhook-{job.webhook_id}",
                                     daemon=True).start()
                lane.append(job)
        if dropped:
            self._log(job, 0, None, f"dropped: {MAX_PENDING} deliveries are already waiting for this webhook")

    def _drain(self, webhook_id: str) -> None:
        """The lane of one webhook: its jobs in order, until none is left (or the worker stops)."""
        while not self._stopping.is_set():
            with self._lock:
                lane = self._lanes[webhook_id]
                if not lane:
                    del self._lanes[webhook_id]
                    return
                job = lane.popleft()
            try:
                self._deliver(job)
            except Exception:  # a database error: this job is lost, the lane goes on
                log.exception("delivery %s of webhook %s failed", job.delivery, webhook_id)
        with self._lock:
            self._lanes.pop(webhook_id, None)

    def _deliver(self, job: Job) -> None:
        """Attempt `job` until it is answered, fails for good, or runs out of attempts."""
        for attempt in range(1, len(self.backoff) + 2):
            hook = self.webhooks.active(job.webhook_id)  # read again: it may be deleted, disabled or changed since
            if hook is None:
                return
            status, error = self._post(hook, job)
            self._log(job, attempt, status, error)
            if not (status is None or status >= 500) or attempt > len(self.backoff):
                return
            if self._stopping.wait(self.backoff[attempt - 1]):
                return

    def _post(self, hook: Webhook, job: Job) -> tuple[int | None, str | None]:
        """One signed POST of `job` to the webhook's URL: (status, None), or (None, why it failed)."""
        url = urlsplit(hook.url)
        connection_type = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        headers = {"Content-Type": "application/json", "User-Agent": "loradock-registry",
                   **signed_headers(hook.secret, job.delivery, job.body, int(time.time()))}
        connection = connection_type(url.hostname, url.port, timeout=self.timeout)
        try:
            connection.request("POST", (url.path or "/") + (f"?{url.query}" if url.query else ""), job.body, headers)
            response = connection.getresponse()
            response.read(64 << 10)  # the answer is not kept; a little is read so the subscriber's write completes
            return response.status, None
        except (OSError, http.client.HTTPException) as e:
            return None, f"{type(e).__name__}: {e}"[:500]
        finally:
            connection.close()

    def _log(self, job: Job, attempt: int, status: int | None, error: str | None) -> None:
        try:
            self.webhooks.log(job.webhook_id, Attempt(job.delivery, job.event, attempt, status, error, now()))
        except Exception:  # the log is best effort: the delivery is what matters
            log.exception("delivery %s of webhook %s not logged", job.delivery, job.webhook_id)
