"""`mars-ray serve` in a process of its own, for the tests that stop it the way services are
stopped or call it from another framework's client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def start_serve(args: list[str], log: Path, *, timeout: float = 180) -> subprocess.Popen:
    """``python -m mars_ray.cli serve ARGS`` in its own session, with its own private local Ray
    and its output in ``log``; returns once it printed "serving " or exited, or ``timeout`` passed
    (the caller asserts on the log, and stops the process)."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mars_ray.cli", "serve", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + timeout
        while "serving " not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc
