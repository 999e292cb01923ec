"""What a person reads while a command runs.

- One line per stage: a progress bar on a terminal (tqdm, on stderr), otherwise one plain line
  when the stage ends (logs, CI, ``ray job logs``).
- The libraries' own chatter off unless ``--verbose`` (``MARS_RAY_VERBOSE=1``): Ray's forwarding
  of worker output to the driver and its INFO lines, Ray Data's progress logging, transformers'
  load reports and progress bars. Worker output is still written to the Ray session's log files
  (``/tmp/ray/session_latest/logs``), and errors still reach the driver as exceptions.

Only the standard library at import time; tqdm (a transformers dependency) when a bar is drawn.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

VERBOSE_ENV = "MARS_RAY_VERBOSE"
# "bar", "plain" or "off"; unset: a bar when stderr is a terminal, plain lines otherwise.
PROGRESS_ENV = "MARS_RAY_PROGRESS"

# Deprecation notices raised inside dependencies, not by anything a user wrote.
_DEPENDENCY_WARNINGS = (
    r".*is_gradient_checkpointing.*",
    r".*torch\.utils\._pytree\._register_pytree_node.*",
)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


def set_verbose(on: bool) -> None:
    """``--verbose``: the libraries' own output comes back (here and in Ray workers started later)."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


def library_env() -> dict[str, str]:
    """Environment that keeps transformers and the hub client quiet (driver and workers)."""
    if is_verbose():
        return {}
    return {
        "TRANSFORMERS_VERBOSITY": "error",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }


def worker_log_env() -> dict[str, str]:
    """Ray's C++ log level for workers: the default, whatever the driver connected with."""
    return {BACKEND_LOG_ENV: os.environ.get(BACKEND_LOG_ENV) or "info"}


def quiet_libraries() -> None:
    """Turn the libraries' chatter off in this process (idempotent; nothing when verbose)."""
    if is_verbose():
        return
    for k, v in library_env().items():
        os.environ.setdefault(k, v)
    for pattern in _DEPENDENCY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if "transformers" in sys.modules:  # already imported: the environment is read only at import
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()


def quiet_ray_data() -> None:
    """Ray Data without its own progress output on the driver (its log file keeps everything)."""
    if is_verbose():
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        if not type(handler).__name__.startswith("SessionFileHandler"):
            handler.setLevel(logging.ERROR)


def ray_init_kwargs() -> dict[str, Any]:
    """``ray.init`` arguments for the driver: worker output stays in the session's log files."""
    if is_verbose():
        return {}
    return {"log_to_driver": False, "logging_level": logging.WARNING}


# Ray's C++ log level. Ray Data passes object refs to the constructor of every actor-pool actor,
# and Ray core logs an error line on the driver's stderr for each one ("has constructor arguments
# in the object store and max_restarts > 0", ray-project/ray#53727): nothing a user can act on.
# The driver's core worker reads this variable once, when it connects.
BACKEND_LOG_ENV = "RAY_BACKEND_LOG_LEVEL"


@contextlib.contextmanager
def quiet_ray_core() -> Iterator[None]:
    """Within: a ``ray.init`` whose driver logs only fatal C++ errors (when not verbose). Workers
    keep Ray's default level (:func:`worker_log_env`), so their log files are complete; a private
    local Ray's raylet and GCS, started inside, log fatal errors only."""
    if is_verbose() or BACKEND_LOG_ENV in os.environ:
        yield
        return
    import tempfile

    os.environ[BACKEND_LOG_ENV] = "fatal"
    # The core worker announces the level it read on stderr as it starts: keep what else is
    # written there during start-up, and drop that one line.
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            os.environ.pop(BACKEND_LOG_ENV, None)
            caught.seek(0)
            for line in caught.read().decode("utf-8", errors="replace").splitlines(keepends=True):
                if "Set ray log level from environment variable" not in line:
                    sys.stderr.write(line)
            sys.stderr.flush()


def _mode() -> str:
    mode = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if mode in ("bar", "plain", "off"):
        return mode
    return "bar" if sys.stderr.isatty() and not is_verbose() else "plain"


def say(text: str) -> None:
    """One line for the user (stdout), kept clear of a progress bar being drawn."""
    if _ACTIVE and _ACTIVE[-1]._bar is not None:
        _ACTIVE[-1]._bar.write(text, file=sys.stdout)
    else:
        print(text, flush=True)


class Stage:
    """One stage's line: ``advance`` as work completes, ``done`` with what came out."""

    def __init__(self, label: str, total: int | None, unit: str) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.count = 0
        self.result = ""
        self.t0 = time.perf_counter()
        self._bar: Any = None
        if _mode() == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total,
                desc=label,
                unit=f" {unit}",
                file=sys.stderr,
                leave=True,
                dynamic_ncols=True,
                bar_format="{desc} {bar:20} {n_fmt}/{total_fmt}{unit} [{elapsed}] {postfix}"
                if total
                else "{desc} {n_fmt}{unit} [{elapsed}] {postfix}",
            )

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def advance(self, n: int = 1) -> None:
        if self.total is not None:
            n = max(0, min(int(n), self.total - self.count))
        self.count += int(n)
        if self._bar is not None and n:
            self._bar.update(n)

    def done(self, result: str) -> None:
        """What the stage produced, shown at the end of its line."""
        self.result = result

    def _close(self, ok: bool) -> None:
        secs = self.seconds
        if ok and self.total is not None and self.count < self.total:  # work done elsewhere (e.g. in training)
            if self._bar is not None:
                self._bar.update(self.total - self.count)
            self.count = self.total
        if self._bar is not None:
            self._bar.set_postfix_str(self.result if ok else "failed", refresh=False)
            self._bar.close()
        elif ok and _mode() == "plain":
            counted = f" {self.count}/{self.total} {self.unit}" if self.total else ""
            tail = f": {self.result}" if self.result else ""
            print(f"{self.label}{counted}{tail} ({secs:.0f}s)", flush=True)


_ACTIVE: list[Stage] = []


def current() -> Stage | None:
    """The innermost stage running in this process (what a Ray Data stage reports progress to)."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def stage(label: str, total: int | None = None, unit: str = "rows") -> Iterator[Stage]:
    s = Stage(label, total, unit)
    _ACTIVE.append(s)
    ok = False
    try:
        yield s
        ok = True
    finally:
        _ACTIVE.remove(s)
        s._close(ok)
