"""Shared helpers for benchmarks: run a variant in a fresh process, collect times and peak RSS."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def run_variant(script: Path, variant: str, *args: str, reps: int) -> dict:
    """Run ``script --variant V --reps N`` in its own process; it prints one JSON line of results."""
    out = subprocess.run(
        [sys.executable, str(script), "--variant", variant, "--reps", str(reps), *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def table(rows: list[dict], baseline: str) -> str:
    base = statistics.median(next(r for r in rows if r["variant"] == baseline)["seconds"])
    lines = [f"{'variant':34s} {'median s':>9s} {'rows/s':>10s} {'vs ' + baseline:>16s} {'peak RSS MB':>12s}"]
    for r in rows:
        med = statistics.median(r["seconds"])
        lines.append(
            f"{r['variant']:34s} {med:9.3f} {r['rows'] / med:10.0f} {base / med:15.2f}x {r['peak_rss_mb']:12.0f}"
        )
    return "\n".join(lines)
