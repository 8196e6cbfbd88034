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
