"""Fault injection for the chaos tests, driven by one environment variable.

``MARS_RAY_CHAOS`` holds ``;``-separated rules ``<point>@<n>:<action>=<marker>``. A process that
reaches ``<point>`` (a :func:`point` call in the code) for the ``n``-th time claims ``<marker>``
(created with ``O_EXCL``; a rule whose marker exists never fires again, in any process) and then
acts:

- ``kill``: SIGKILL itself (a Ray Data actor or a training worker dies mid-work; with the stages
  in the driver, the driver does);
- ``pause``: sleep until killed (at most ``MARS_RAY_CHAOS_PAUSE_S`` seconds, default 600), so a
  test that waits for the marker can kill another process (the driver) at exactly this point;
- ``raise``: raise RuntimeError (a training worker fails; Ray Train restarts the group from its
  last checkpoint, or the run fails when ``max_failures`` is spent).

Points: ``paraphrase.batch`` / ``refine.batch`` (a generation actor has generated, cached and gated
a batch and is about to return it), ``train.checkpoint.epoch<t>`` (rank 0 of MARS epoch t's
training run has reported a checkpoint; ``epoch0`` is the warm-up), ``train.step.epoch<t>`` (rank 0
is about to start an optimizer step: visit ``v`` comes before step ``v - 1``, counted from 0, in
that process).
Unset, :func:`point` is one dictionary lookup. Marker paths should be absolute (each process
resolves a relative one against its own working directory). The driver's rules reach Ray Data
stage actors (their ``runtime_env``) and Ray Train workers (the loop's config) on any cluster.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter

ENV = "MARS_RAY_CHAOS"
PAUSE_ENV = f"{ENV}_PAUSE_S"
ACTIONS = ("kill", "pause", "raise")
_hits: Counter[str] = Counter()


def settings() -> dict[str, str]:
    """This process's chaos variables (empty when none is set), to hand to other processes."""
    return {k: os.environ[k] for k in (ENV, PAUSE_ENV) if os.environ.get(k)}


def adopt(env: dict[str, str] | None) -> None:
    """Take over the rules :func:`settings` gave (in a worker started without them)."""
    for k, v in (env or {}).items():
        os.environ.setdefault(k, v)


def parse(spec: str) -> list[tuple[str, int, str, str]]:
    """``(point, n, action, marker)`` for every rule of ``spec``; ValueError names a bad rule."""
    rules = []
    for raw in filter(None, (r.strip() for r in spec.split(";"))):
        head, sep, marker = raw.partition("=")
        where, _, action = head.partition(":")
        name, _, n = where.partition("@")
        if not sep or not marker or action not in ACTIONS or not name or not n.isdigit() or int(n) < 1:
            raise ValueError(f"{ENV}: bad rule {raw!r} (expected <point>@<n>:kill|pause|raise=<marker file>)")
        rules.append((name, int(n), action, marker))
    return rules


def point(name: str) -> None:
    """Count a visit to ``name``; fire the matching rule of ``MARS_RAY_CHAOS``, if any."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    _hits[name] += 1
    for rule_name, n, action, marker in parse(spec):
        if rule_name != name or _hits[name] != n:
            continue
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue  # fired once already (this process or another)
        os.write(fd, f"{name}@{n} pid {os.getpid()}\n".encode())
        os.close(fd)
        sys.stdout.flush()
        sys.stderr.flush()
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "raise":
            raise RuntimeError(f"injected fault at {name} (visit {n}, {ENV} rule)")
        deadline = time.monotonic() + float(os.environ.get(PAUSE_ENV, "600"))
        while time.monotonic() < deadline:
            time.sleep(0.1)
