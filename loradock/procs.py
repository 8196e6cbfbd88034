"""Process plumbing for the demo, the benchmarks and the tests: ports, services, one-shot commands, tokens.

    from loradock.procs import Service, free_port, loradock_command

    port = free_port()
    with Service("loradock serve", loradock_command("serve", "--port", port), Path("serve.log")) as server:
        server.wait_healthy(f"http://127.0.0.1:{port}/health", timeout=600)
        ...  # stopped (SIGTERM, then SIGKILL) when the block ends

Standard library only, and nothing from sft/, serve/, ui/ or hub/: every layer may use it. A service
is ready when its health URL answers, never when its log says so.
"""

import contextlib
import ctypes
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection
from pathlib import Path

from loradock.errors import LoradockError

TAIL_LINES = 15
ORPHAN_GRACE = 3.0  # seconds a service may take to stop on its own once its starter is gone, then SIGKILL
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Looked up before any fork: a child of a threaded parent must not load libraries between fork and exec.
PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the system's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loradock_command(*args) -> list[str]:
    """The argv of `loradock ARGS` with this Python (the console script need not be on PATH)."""
    return [sys.executable, "-m", "loradock.cli", *map(str, args)]


def log_tail(log: Path, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of a log, for an error message (progress bars' carriage returns end lines too)."""
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        return f"(no log at {log})"
    return "\n".join([line for line in re.split(r"[\r\n]+", text) if line.strip()][-lines:]) or "(nothing yet)"


def http_status(url: str) -> int | None:
    """The status a GET of `url` answers with; None while nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:  # refused, reset, timed out: not up (yet)
        return None


class Service:
    """A long-running command in its own process group, its output (stdout and stderr) in `log`.

    It starts when constructed. `stop()` signals only this group, so whatever the command started in
    the same group goes with it; used as a context manager, it is stopped when the block ends. On
    Linux it also gets SIGTERM when the process that started it dies, even by SIGKILL, and a small
    watchdog process (`watch`) SIGKILLs whatever is left of its group `ORPHAN_GRACE` seconds later:
    a killed `loradock serve` leaves no vLLM behind, even one still waiting for its clients'
    connections to close.

    Args:
        name: what error messages call it ("the registry", "loradock serve").
        argv: the command (`loradock_command(...)` for a loradock one).
        log: the file that receives its output; truncated first unless `append`.
        env: its environment (default: this process's).
        grace: seconds `stop()` waits after SIGTERM before SIGKILL.
    """

    def __init__(self, name: str, argv: list[str], log: Path, env: dict | None = None, append: bool = False,
                 grace: float = 60):
        self.name, self.log, self.grace = name, Path(log), grace
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a" if append else "w") as out:
            self.process = subprocess.Popen([str(a) for a in argv], env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=functools.partial(die_with_parent, os.getpid()))
        if PRCTL is not None:
            subprocess.Popen([sys.executable, "-m", "loradock.procs", "watch", str(os.getpid()), str(self.process.pid),
                              str(ORPHAN_GRACE)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_healthy(self, url: str, timeout: float, ok_statuses: Collection[int] = frozenset({200})) -> "Service":
        """Poll `url` until it answers with one of `ok_statuses`. If the process exits first, or `timeout`
        seconds pass, it is stopped and a `LoradockError` carries the end of its log."""
        deadline = time.monotonic() + timeout
        while (status := http_status(url)) not in ok_statuses:
            if self.process.poll() is not None:
                raise LoradockError(f"{self.name} exited with status {self.process.returncode} before {url} answered; "
                                    f"its log ends:\n{log_tail(self.log)}", f"see the whole log in {self.log}")
            if time.monotonic() > deadline:
                self.stop()
                seen = f"it last answered {status}" if status else "nothing answered"
                raise LoradockError(f"{self.name} was not ready after {timeout:.0f} s ({url}: {seen}); its log ends:\n"
                                    f"{log_tail(self.log)}", f"see the whole log in {self.log}")
            time.sleep(0.3)
        return self

    def stop(self) -> int:
        """SIGTERM to the process group, SIGKILL after the grace period; returns the exit status."""
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def kill(self) -> int:
        """SIGKILL to the process group now (a crash, for tests of what survives one); returns the exit status."""
        if self.process.poll() is None:
            self._signal(signal.SIGKILL)
            self.process.wait()
        return self.process.returncode

    def _signal(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)  # its own group (start_new_session): the group id is its pid
        except ProcessLookupError:
            pass  # it has just exited


def die_with_parent(parent: int) -> None:
    """Run in a child between fork and exec: ask Linux for SIGTERM when the parent dies (PR_SET_PDEATHSIG,
    which no standard-library call sets); if the parent is already gone, terminate now. Elsewhere, nothing."""
    if PRCTL is None:
        return
    PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of the group belongs to someone else now: not ours to watch
        return False
    return True


def watch(parent: int, group: int, grace: float) -> None:
    """The watchdog of one service (`python -m loradock.procs watch PARENT GROUP GRACE`): while the
    service's process group `group` lives, wait for its starter `parent` to die (this process is
    then re-parented); then SIGTERM the group and SIGKILL what is left of it after `grace` seconds.

    PR_SET_PDEATHSIG alone gives the service's first process a SIGTERM, which a server may answer by
    waiting for its clients to hang up (vLLM's API server does, while streams are open) and which
    the rest of its group never gets. Returns as soon as the group is empty."""
    while os.getppid() == parent:
        if not group_alive(group):
            return
        time.sleep(0.2)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + grace
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signum)
        while group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.05)


def run_loradock(*args, log: Path, env: dict | None = None, every: Callable[[], None] | None = None) -> None:
    """Run `loradock ARGS` to completion with its output in `log` (this run only), calling `every()`
    about twice a second meanwhile (to follow its progress). A failure raises with the log's end;
    an interrupt stops the command too.
    """
    what = f"`loradock {' '.join(map(str, args[:2]))}`"
    with Service(what, loradock_command(*args), log, env=env) as command:
        while True:
            try:
                code = command.process.wait(timeout=0.5 if every else None)
                break
            except subprocess.TimeoutExpired:
                every()
        if every:
            every()
    if code:
        raise LoradockError(f"{what} failed (exit {code}); its log ends:\n{log_tail(log)}", f"see the whole log in {log}")


def create_token(root: Path, user: str, read_only: bool = False, name: str | None = None) -> str:
    """A new token of the registry kept at `root` (`loradock hub token create`), for `user`."""
    args = ["hub", "token", "create", "--root", root, "--user", user]
    args += ["--read-only"] if read_only else []
    args += ["--name", name] if name else []
    created = subprocess.run(loradock_command(*args), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if created.returncode:  # nothing was printed on stdout then: no token reaches the message
        raise LoradockError(f"`loradock hub token create --root {root} --user {user}` failed (exit {created.returncode}):\n"
                            f"{created.stderr.strip()[-2000:]}", "check that the registry's --root is right and writable")
    return created.stdout.strip()


def add_org_member(root: Path, org: str, user: str, role: str = "write") -> None:
    """`user` made a `role` member of organisation `org` (added when missing) in the registry at
    `root` (`loradock hub org add`)."""
    added = subprocess.run(loradock_command("hub", "org", "add", org, "--member", f"{user}:{role}", "--root", root),
                           capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if added.returncode:
        raise LoradockError(f"`loradock hub org add {org} --member {user}:{role} --root {root}` failed "
                            f"(exit {added.returncode}):\n{added.stderr.strip()[-2000:]}",
                            "check that the registry's --root is right and writable")


def start_registry(root: Path, port: int, log: Path, *args, append: bool = False, timeout: float = 60) -> Service:
    """`loradock hub serve --root ROOT --port PORT ARGS` on 127.0.0.1, returned once it answers."""
    registry = Service("the registry", loradock_command("hub", "serve", "--root", root, "--port", port, *args), log,
                       append=append)
    return registry.wait_healthy(f"http://127.0.0.1:{port}/health", timeout)


class StepsInLog:
    """How many optimizer steps a child's Trainer has done, read from the tqdm bar it writes into its log
    (` 45%|████▌     | 162/360 [00:09<00:10, 17.2it/s]`).

    Bars with a description (datasets' `Map: ...`, transformers' `Loading weights: ...`) are not the
    Trainer's; with `total`, bars of another length (the evaluation's) are skipped as well. When a
    new training bar starts (another total, or a count that went back), the finished one's steps are
    kept: the base model's build trains twice, and its steps add up.
    """

    BAR = re.compile(r"\s*\d+%\|[^|]*\|\s*(\d+)/(\d+) \[")

    def __init__(self, log: Path, total: int | None = None):
        self.log, self.total = Path(log), total
        self.offset, self.finished, self.current = 0, 0, None  # bytes read; steps of finished bars; (n, total)

    def read(self) -> int:
        """Steps done so far (reads what the log gained since the last call)."""
        try:
            with self.log.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return 0
        self.offset += len(chunk)
        for piece in re.split(r"[\r\n]", chunk.decode(errors="replace")):
            match = self.BAR.match(piece)
            if not match or (self.total and int(match[2]) != self.total):
                continue
            n, total = int(match[1]), int(match[2])
            if self.current and (total != self.current[1] or n < self.current[0]):
                self.finished += self.current[1]
            self.current = (n, total)
        return self.finished + (self.current[0] if self.current else 0)


if __name__ == "__main__" and sys.argv[1:2] == ["watch"]:
    watch(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
