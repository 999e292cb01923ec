"""Files that are whole or absent: every output a command writes goes through here.

- :func:`atomic_path` / :func:`write_text` / :func:`write_json`: write a temporary file beside the
  target, flush and fsync it, then ``os.replace`` it over the target, so a reader (or a crash, or a
  full disk) never sees half a file: the target holds its previous content or the new one.
- :func:`append_line`: one complete JSON line per call, flushed and fsynced (append-only logs).
- :func:`read_jsonl`: a reader of such logs that tolerates a torn LAST line (a crash mid-append)
  and reports it; a bad line anywhere else is an error naming the file and line.
- :func:`move_dir`: move a directory (across file systems too) so the target is whole or absent,
  and a failed copy (a full disk) raises naming the file it could not write.
- :func:`replace_dir`: put a complete new directory in place of an old one with no moment in which
  the path is missing (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames, the gap between
  them is said in the docstring).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from mars_ray.core.jsonable import json_default


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to (by any writer that takes a path); on a
    clean exit it is fsynced and renamed over ``path``; on an error it is removed and ``path`` is
    left as it was. ``suffix`` keeps an extension writers look at (e.g. ".png", ".npz")."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp{suffix or target.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as e:
        with suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno is not None and not e.filename:
            # e.g. ENOSPC / EFBIG from a bare write: say which file could not be written
            raise OSError(e.errno, f"{e.strerror} (writing {target}; its previous content is kept)", str(target)) from e
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, default: Callable | None = None) -> Path:
    text = json.dumps(obj, indent=indent, ensure_ascii=False, default=default or json_default)
    return write_text(path, text + "\n")


def write_jsonl(path: str | os.PathLike, rows: Any) -> Path:
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=json_default) + "\n" for r in rows))


def append_line(path: str | os.PathLike, obj: Any) -> None:
    """Append ``obj`` as one JSON line (a single write of the whole line), flushed and fsynced."""
    line = (json.dumps(obj, ensure_ascii=False, default=json_default) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


class TornLog(ValueError):
    """A JSON-lines file with a bad line before its last one (not a torn append): corrupt."""


def read_jsonl(path: str | os.PathLike, *, on_torn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Rows of a JSON-lines log. A last line that is incomplete (no newline) or not JSON is the
    trace of an interrupted append: it is dropped and reported through ``on_torn``. Any other bad
    line raises :class:`TornLog` naming the file and line."""
    p = Path(path)
    text = p.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]  # tail: after the last newline ("" when the file ends with one)
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            if i == len(complete) and not tail.strip():
                if on_torn is not None:
                    on_torn(f"{p}: line {i} is not JSON ({e}); dropped as a torn last line")
                return rows
            raise TornLog(f"{p}: line {i} is not JSON ({e}); the log is corrupt before its last line") from None
    if tail.strip():
        try:
            rows.append(json.loads(tail))  # a complete object that only lacks its newline
        except ValueError:
            if on_torn is not None:
                on_torn(f"{p}: line {len(complete) + 1} is incomplete; dropped as a torn last line")
    return rows


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the complete directory ``new`` to ``target``, replacing what is there.

    When ``target`` exists the two are exchanged in one atomic step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``), so ``target`` is complete at every moment, then the old content is
    deleted. Where the exchange is not supported (another OS, some network file systems) the old
    directory is first renamed aside and ``new`` renamed in: ``target`` is missing only between
    those two renames, never partly written.
    """
    new_p, target_p = Path(new), Path(target)
    if not target_p.exists():
        os.replace(new_p, target_p)
        _fsync_dir(target_p.parent)
        return
    if _exchange(new_p, target_p):
        _fsync_dir(target_p.parent)
        shutil.rmtree(new_p)  # now holds the old content
        return
    old = target_p.with_name(f".{target_p.name}.old.{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    os.replace(target_p, old)
    try:
        os.replace(new_p, target_p)
    except BaseException:
        os.replace(old, target_p)  # put the old content back: the target is never left missing
        raise
    _fsync_dir(target_p.parent)
    shutil.rmtree(old)


def move_dir(src: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the directory ``src`` to ``target`` (replacing it): a rename on one file system; across
    file systems (EXDEV) a file-by-file copy into a temporary sibling of ``target``, fsynced,
    swapped in whole by :func:`replace_dir`, and only then ``src`` is removed. A copy that fails
    (ENOSPC, EFBIG, ...) removes the temporary, leaves ``target`` and ``src`` as they were, and
    raises OSError naming the file. Any other rename error is raised as is."""
    src_p, target_p = Path(src), Path(target)
    if not src_p.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no directory to move", str(src_p))
    target_p.parent.mkdir(parents=True, exist_ok=True)
    tmp = target_p.with_name(f".{target_p.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        os.rename(src_p, tmp)  # same file system: nothing to copy
        copied = False
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        _copy_tree(src_p, tmp, target_p)
        copied = True
    replace_dir(tmp, target_p)
    if copied:
        shutil.rmtree(src_p, ignore_errors=True)
    return target_p


def _copy_tree(src: Path, tmp: Path, target: Path) -> None:
    """Copy ``src`` into ``tmp`` (which will become ``target``), every file and directory fsynced;
    on any error ``tmp`` is removed and an OSError names the file of ``target`` not written."""

    def fail(e: OSError) -> None:
        raise e

    try:
        for d, _, files in os.walk(src, onerror=fail):
            rel = Path(d).relative_to(src)
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            for f in files:
                try:
                    shutil.copy2(Path(d) / f, tmp / rel / f)
                    with open(tmp / rel / f, "rb+") as fh:
                        os.fsync(fh.fileno())
                except OSError as e:
                    if e.errno is None:
                        raise
                    where = target / rel / f
                    raise OSError(
                        e.errno, f"{e.strerror} (writing {where}; {target} is kept as it was)", str(where)
                    ) from e
            _fsync_dir(tmp / rel)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_output_dir(
    path: Path, *, overwrite: bool, owned: tuple[str, ...], in_use: Callable[[Path], Exception]
) -> None:
    """Make ``path`` ready for a new run of a command: a non-empty directory is refused with
    ``in_use(path)`` unless ``overwrite``; with it, the entries the command writes (``owned``) are
    removed and anything else a user put there is left alone. Creates the directory."""
    used = path.exists() and any(path.iterdir())
    if used and not overwrite:
        raise in_use(path)
    if used:
        for name in owned:
            p = path / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    path.mkdir(parents=True, exist_ok=True)
