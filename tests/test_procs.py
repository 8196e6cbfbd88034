"""loradock.procs: a service does not outlive the process that started it."""

import os
import signal
import subprocess
import sys
import time

import pytest

PARENT = """
import sys, time
from pathlib import Path
from loradock.procs import Service
service = Service("sleeper", [sys.executable, "-c", "import time; time.sleep(300)"], Path(sys.argv[1]))
print(service.process.pid, flush=True)
time.sleep(300)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead, only not yet reaped by init
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_service_is_terminated_when_its_starter_is_killed(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "sleeper.log")], stdout=subprocess.PIPE,
                              text=True)
    child = int(parent.stdout.readline())
    try:
        assert alive(child)
        parent.send_signal(signal.SIGKILL)  # no handler, no finally: only the kernel can tell the child
        parent.wait()
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), "the service outlived the process that started it"
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)


# A server that answers SIGTERM by waiting (vLLM's API server waits for open streams to close), with a
# second process in its group that never hears of it.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print(helper.pid, flush=True)
time.sleep(300)
"""

STUBBORN_PARENT = """
import sys, time
from pathlib import Path
from loradock.procs import Service
log = Path(sys.argv[1])
service = Service("stubborn", [sys.executable, "-c", sys.argv[2]], log)
while not log.read_text().strip():
    time.sleep(0.05)
print(service.process.pid, log.read_text().strip(), flush=True)
time.sleep(300)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_service_that_ignores_sigterm_is_killed_with_its_group_soon_after_its_starter(tmp_path):
    from loradock.procs import ORPHAN_GRACE

    parent = subprocess.Popen([sys.executable, "-c", STUBBORN_PARENT, str(tmp_path / "stubborn.log"), STUBBORN],
                              stdout=subprocess.PIPE, text=True)
    service, helper = map(int, parent.stdout.readline().split())
    try:
        assert alive(service) and alive(helper)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        killed = time.monotonic()
        while (alive(service) or alive(helper)) and time.monotonic() - killed < ORPHAN_GRACE + 10:
            time.sleep(0.05)
        assert not alive(service) and not alive(helper), "the service or its group outlived its starter"
        assert time.monotonic() - killed < ORPHAN_GRACE + 3
    finally:
        for pid in (service, helper):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_the_watchdog_leaves_with_its_service(tmp_path):
    """A service stopped the usual way takes its watchdog with it: nothing of it is left to watch."""
    from loradock.procs import Service

    service = Service("sleeper", [sys.executable, "-c", "import time; time.sleep(300)"], tmp_path / "s.log")
    group = service.process.pid
    watchdogs = lambda: [pid for pid in os.listdir("/proc") if pid.isdigit() and watching(int(pid), group)]  # noqa: E731
    deadline = time.monotonic() + 10
    while not watchdogs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert watchdogs(), "no watchdog was started"
    service.stop()
    deadline = time.monotonic() + 10
    while watchdogs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not watchdogs()


def watching(pid: int, group: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"loradock.procs" in argv and b"watch" in argv and str(group).encode() in argv and alive(pid)
