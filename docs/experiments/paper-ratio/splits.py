"""Disjoint train / tuning / held-out files for the paper-ratio experiment (issue 18).

Rows of one prompt always land in the same split (the prompt is the HH shared prefix, or the
``prompt`` field). Prompts are shuffled with a fixed seed and dealt out in order: the training file
until it holds ``--train`` pairs, then the tuning file (hyperparameters are chosen on it and its
numbers are never reported) until ``--tune`` pairs, then the reported held-out file until
``--heldout`` pairs. The rest of the file is not used. The files are written under ``--out`` (not
committed: the data stays in ``../shared/data``); a manifest records each split's source line
numbers and the sha256 of every file, so a rerun can be checked to be the same split.

    python docs/experiments/paper-ratio/splits.py --dataset hh --out runs/paper-ratio/data
    python docs/experiments/paper-ratio/splits.py --dataset pku --out runs/paper-ratio/data
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

from mars_ray.data.formats import split_hh_transcripts

SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "data"
SOURCES = {
    "hh": SHARED / "hh_rlhf_helpful_base_test.jsonl",
    "pku": SHARED / "pku_saferlhf_v0test_safe_vs_unsafe_3590.jsonl",
}


def prompt_of(dataset: str, row: dict) -> str:
    if dataset == "hh":
        return split_hh_transcripts(row["chosen"], row["rejected"])[0]
    return str(row["prompt"])


def make_splits(dataset: str, out: Path, train: int, tune: int, heldout: int, seed: int) -> dict:
    src = SOURCES[dataset]
    lines = src.read_text(encoding="utf-8").splitlines()
    groups: dict[str, list[int]] = {}
    for i, line in enumerate(lines):
        groups.setdefault(prompt_of(dataset, json.loads(line)), []).append(i)
    prompts = sorted(groups)
    random.Random(seed).shuffle(prompts)
    targets = [("train", train), ("tune", tune), ("heldout", heldout)]
    chosen: dict[str, list[int]] = {name: [] for name, _ in targets}
    k = 0
    for name, size in targets:
        while len(chosen[name]) < size and k < len(prompts):
            chosen[name].extend(groups[prompts[k]])
            k += 1
        if len(chosen[name]) < size:
            raise SystemExit(f"{src}: only {len(chosen[name])} rows left for the {name} split ({size} asked)")
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"source": str(src), "seed": seed, "rows_in_source": len(lines), "splits": {}}
    for name, rows in chosen.items():
        rows.sort()
        path = out / f"{dataset}_{name}.jsonl"
        text = "".join(lines[i] + "\n" for i in rows)
        path.write_text(text, encoding="utf-8")
        manifest["splits"][name] = {
            "path": str(path),
            "rows": len(rows),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "source_lines": [i + 1 for i in rows],
        }
    (out / f"{dataset}_manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=sorted(SOURCES), required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/paper-ratio/data"))
    ap.add_argument("--train", type=int, default=125)
    ap.add_argument("--tune", type=int, default=500)
    ap.add_argument("--heldout", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=18)
    a = ap.parse_args()
    m = make_splits(a.dataset, a.out, a.train, a.tune, a.heldout, a.seed)
    for name, s in m["splits"].items():
        print(f"{name}: {s['rows']} rows -> {s['path']} (sha256 {s['sha256'][:12]})")


if __name__ == "__main__":
    main()
