"""Whole-or-absent outputs: atomic writes, torn-line tolerant logs, a model/ swap that is never
missing (no Ray)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time

import pytest

from mars_ray.core import atomic


def test_write_is_all_or_nothing_on_a_full_disk(tmp_path):
    """A file-size limit (RLIMIT_FSIZE) stands in for a full disk: the write fails, the previous
    content stays, no temporary file is left, and the error names the path."""
    target = tmp_path / "metrics.json"
    atomic.write_json(target, {"epoch": 1})
    code = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
from mars_ray.core import atomic
try:
    atomic.write_json({str(target)!r}, {{"epoch": 2, "blob": "x" * 100000}})
except OSError as e:
    print("ERR", e)
    sys.exit(3)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 3, p.stderr
    assert "File too large" in p.stdout and "metrics.json" in p.stdout
    assert json.loads(target.read_text()) == {"epoch": 1}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["metrics.json"]


def test_torn_last_line_is_dropped_and_reported_a_bad_middle_line_is_not(tmp_path):
    log = tmp_path / "metrics.jsonl"
    for step in range(3):
        atomic.append_line(log, {"step": step})
    with log.open("a") as f:
        f.write('{"step": 3, "loss": 0.')  # a crash mid-append
    torn: list[str] = []
    rows = atomic.read_jsonl(log, on_torn=torn.append)
    assert [r["step"] for r in rows] == [0, 1, 2] and len(torn) == 1 and "line 4" in torn[0]
    # appending after the torn line (a resumed run) keeps working: the torn fragment ends its line
    with log.open("a") as f:
        f.write("\n")
    atomic.append_line(log, {"step": 3})
    torn.clear()
    with pytest.raises(atomic.TornLog, match="line 4"):
        atomic.read_jsonl(log)
    # a last line without its newline but complete is kept
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"a": 1}\n{"a": 2}')
    assert atomic.read_jsonl(ok) == [{"a": 1}, {"a": 2}]


def test_replace_dir_never_leaves_the_target_missing(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text('{"v": 0}')
    seen_missing = 0
    seen = set()
    stop = threading.Event()

    def reader():
        nonlocal seen_missing
        while not stop.is_set():
            try:
                seen.add(json.loads((target / "config.json").read_text())["v"])
            except (FileNotFoundError, NotADirectoryError):
                seen_missing += 1
            except ValueError:
                pass

    t = threading.Thread(target=reader)
    t.start()
    try:
        for v in range(1, 60):
            new = tmp_path / "model.tmp"
            new.mkdir()
            (new / "weights.bin").write_bytes(os.urandom(64 * 1024))
            (new / "config.json").write_text(json.dumps({"v": v}))
            atomic.replace_dir(new, target)
            time.sleep(0.002)
    finally:
        stop.set()
        t.join()
    assert json.loads((target / "config.json").read_text()) == {"v": 59}
    assert not (tmp_path / "model.tmp").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert seen_missing == 0, f"model/config.json was missing {seen_missing} times during the swaps"
    assert len(seen) > 5


def test_an_interrupted_writer_leaves_the_old_file(tmp_path):
    target = tmp_path / "report.md"
    atomic.write_text(target, "old\n")
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed")
    assert target.read_text() == "old\n" and sorted(x.name for x in tmp_path.iterdir()) == ["report.md"]
    assert resource.RLIMIT_FSIZE  # the limit the full-disk test uses exists here


def test_move_dir_replaces_the_target_whole(tmp_path):
    from mars_ray.core.atomic import move_dir

    src, target = tmp_path / "src", tmp_path / "out" / "ckpt"
    (src / "model").mkdir(parents=True)
    (src / "model" / "w.bin").write_bytes(b"new")
    target.mkdir(parents=True)
    (target / "old.bin").write_bytes(b"old")
    assert move_dir(src, target) == target
    assert not src.exists() and (target / "model" / "w.bin").read_bytes() == b"new"
    assert not (target / "old.bin").exists() and sorted(p.name for p in target.parent.iterdir()) == ["ckpt"]


def test_move_dir_across_file_systems_on_a_full_disk_keeps_both_sides(tmp_path, monkeypatch):
    """EXDEV makes move_dir copy; ENOSPC on the second file: OSError naming the target's file, the
    old target intact, the source intact, no temporary left. Other rename errors are not copies."""
    import errno
    import os
    import shutil

    import pytest

    from mars_ray.core import atomic

    src, target = tmp_path / "src", tmp_path / "out" / "ckpt"
    (src / "m").mkdir(parents=True)
    for name in ("a.bin", "b.bin"):
        (src / "m" / name).write_bytes(name.encode())
    target.mkdir(parents=True)
    (target / "old.bin").write_bytes(b"old")
    real_rename, real_copy = os.rename, shutil.copy2

    def cross_device(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    copies = []

    def copy_then_full(a, b):
        copies.append(b)
        if len(copies) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(a, b)

    monkeypatch.setattr(os, "rename", cross_device)
    monkeypatch.setattr(shutil, "copy2", copy_then_full)
    with pytest.raises(OSError) as err:
        atomic.move_dir(src, target)
    assert err.value.errno == errno.ENOSPC and str(target / "m") in str(err.value)
    assert sorted(p.name for p in target.iterdir()) == ["old.bin"]
    assert sorted(p.name for p in (src / "m").iterdir()) == ["a.bin", "b.bin"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["ckpt"]  # no temporary left

    monkeypatch.setattr(shutil, "copy2", real_copy)
    assert atomic.move_dir(src, target) == target  # the copy path, with space
    assert not src.exists() and (target / "m" / "b.bin").read_bytes() == b"b.bin"

    def denied(a, b):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "rename", denied)
    (tmp_path / "src2").mkdir()
    with pytest.raises(PermissionError):
        atomic.move_dir(tmp_path / "src2", target)
    monkeypatch.setattr(os, "rename", real_rename)
    assert (target / "m" / "b.bin").exists()  # untouched
    with pytest.raises(FileNotFoundError):
        atomic.move_dir(tmp_path / "missing", target)
    assert (target / "m" / "b.bin").exists()


def test_prepare_output_dir_refuses_a_used_dir_and_overwrites_only_what_it_owns(tmp_path):
    """One helper for `train` and `align` (they had a copy each): a non-empty directory is refused
    unless overwrite; with it, only the command's own entries go."""
    from mars_ray.core.atomic import prepare_output_dir

    out = tmp_path / "run"
    prepare_output_dir(out, overwrite=False, owned=("model",), in_use=lambda d: ValueError(f"{d} in use"))
    assert out.is_dir()
    (out / "model").mkdir()
    (out / "model" / "w.bin").write_text("x")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="run in use"):
        prepare_output_dir(out, overwrite=False, owned=("model",), in_use=lambda d: ValueError(f"{d} in use"))
    prepare_output_dir(out, overwrite=True, owned=("model", "metrics.jsonl"), in_use=ValueError)
    assert not (out / "model").exists() and (out / "notes.txt").read_text() == "mine"
