"""The gate between requests and unloads of one adapter, inside vLLM's API process (asyncio):
`LoradockMiddleware` holds one. A request for an adapter runs under `using(name)`, an unload under
`unloading(name)`; an unload never pulls an adapter from under a request, and never holds new
requests past its drain deadline."""

import asyncio
import collections
import contextlib

from loradock.errors import Busy


class InFlight:
    """Requests per adapter name, and the names being unloaded: a request waits while its adapter
    is being unloaded; an unload waits until no request uses the adapter, for `drain_timeout`
    seconds at most (then it raises Busy and lets the held requests go)."""

    def __init__(self, drain_timeout: float):
        self.drain_timeout = drain_timeout
        self._count = collections.Counter()
        self._unloading: set[str] = set()
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def using(self, name: str):
        async with self._changed:
            await self._changed.wait_for(lambda: name not in self._unloading)
            self._count[name] += 1
        try:
            yield
        finally:
            async with self._changed:
                self._count[name] -= 1
                if not self._count[name]:
                    del self._count[name]
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def unloading(self, name: str):
        """Raises:
            Busy: another unload of `name`, or requests using it, outlasted the drain deadline."""
        deadline = asyncio.get_running_loop().time() + self.drain_timeout
        async with self._changed:
            if not await self._wait(lambda: name not in self._unloading, deadline):
                raise Busy(f"adapter {name!r} is being unloaded by another request that has waited "
                           f"{self.drain_timeout:g} s already; nothing was done", "try the unload again later")
            self._unloading.add(name)
            if not await self._wait(lambda: not self._count[name], deadline):
                self._unloading.discard(name)
                self._changed.notify_all()
                raise Busy(f"adapter {name!r} is still answering {self._count[name]} request(s) after the "
                           f"{self.drain_timeout:g} s drain deadline: nothing was unloaded, and it goes on serving",
                           "unload it again once they finish, or restart loradock serve with a longer "
                           "--unload-drain-timeout")
        try:
            yield
        finally:
            async with self._changed:
                self._unloading.discard(name)
                self._changed.notify_all()

    async def _wait(self, predicate, deadline: float) -> bool:
        """Wait (holding the condition's lock) until `predicate` holds or the loop's clock reaches
        `deadline`; whether it holds."""
        try:
            async with asyncio.timeout_at(deadline):
                await self._changed.wait_for(predicate)
        except TimeoutError:
            return predicate()
        return True
