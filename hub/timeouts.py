"""How long loradock waits for a registry: every call it makes to one (`loradock push`, `pull`,
`list`, `promote`, `loradock serve`'s pulls) is bounded.

A registry that accepts connections and then answers nothing (stopped with SIGSTOP, its disk hung,
a proxy whose backend is gone) would otherwise hold a call for as long as the client waits, and
huggingface_hub's HTTP client sends without any timeout. Each bound is on silence, not on a whole
transfer: a large upload or download that keeps moving is never cut off. Nothing on `loradock
serve`'s path retries (`model_info`, then `hub.transfer`'s downloads), so a silent registry costs it
one READ_S; huggingface_hub's own retries (uploads, hf_hub_download) may repeat a bound a few times.

    from hub.timeouts import bound_huggingface_hub
    bound_huggingface_hub()  # once; `hub.client.hub_api` does it
"""

import threading

CONNECT_S = 5.0  # to open a connection
READ_S = 5.0  # of silence while the registry answers a read (GET, HEAD): metadata, and file downloads
WRITE_ANSWER_S = 300.0  # before the answer to a write: the registry makes the bytes durable first (fsync, up to 5 GiB)
SEND_S = 30.0  # of a stalled upload: the registry takes no byte for that long
READS = ("GET", "HEAD")

_lock = threading.Lock()
_installed = False


def timeout_for(method: str):
    """The `httpx2.Timeout` of a request with this HTTP method."""
    import httpx2

    read = READ_S if method.upper() in READS else WRITE_ANSWER_S
    return httpx2.Timeout(connect=CONNECT_S, read=read, write=SEND_S, pool=CONNECT_S)


def bound_huggingface_hub() -> None:
    """Make huggingface_hub's shared HTTP client bound every request it sends without a timeout.

    Process-wide, and done once, because that is the only setting there is: HfApi has no client or
    timeout of its own (every method sends through the one client `set_client_factory` makes), and
    a per-call timeout exists only on the `*_info` methods, which pass `timeout=None` explicitly
    when not given one (that disables the client's default timeout too, hence a request hook
    rather than `Client(timeout=...)`). Requests that carry a timeout (hf_hub_download's) keep it.
    """
    global _installed
    from huggingface_hub.utils import set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    with _lock:
        if _installed:
            return

        def bounded_client():
            client = default_client_factory()
            hooks = client.event_hooks
            client.event_hooks = {**hooks, "request": [*hooks.get("request", []), bound_unbounded]}
            return client

        set_client_factory(bounded_client)
        _installed = True


def bound_unbounded(request) -> None:
    """An httpx2 request hook: a request about to be sent with no timeout at all gets `timeout_for`'s."""
    if not any((request.extensions.get("timeout") or {}).values()):
        request.extensions["timeout"] = timeout_for(request.method).as_dict()


def seconds_waited(error) -> float | None:
    """How long the request that raised this `httpx2.TimeoutException` waited; None if unknown."""
    import httpx2

    kind = {httpx2.ConnectTimeout: "connect", httpx2.ReadTimeout: "read", httpx2.WriteTimeout: "write",
            httpx2.PoolTimeout: "pool"}.get(type(error))
    try:
        return (error.request.extensions.get("timeout") or {}).get(kind)
    except RuntimeError:  # raised without its request
        return None
