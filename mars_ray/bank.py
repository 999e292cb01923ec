"""`mars-ray bank`: the generation bank, built before a loop or a comparison, or inspected.

Paraphrases and rewrites depend on the text and the generator's settings, not on the reward model
or the run's seed, so they can be generated once for every epoch, strategy, seed and trial. The
bank is the generation cache (``model.cache_dir``) filled ahead of time by Ray Data actor pools
(GPU actors where ``resources.gpus_per_actor`` asks for them), with keys that make a stored output
the same whoever asked first (:mod:`mars_ray.generation.cache`):

- for every training response (chosen and rejected), the walk of the paraphrase stage for
  ``bank.paraphrases`` gated paraphrases (:class:`~mars_ray.stages.generate.ParaphraseActor`): its
  deterministic outputs, then sampled candidates 0, 1, 2, ... by index;
- for every low-distance pair (``semantic.enabled``), every rewrite attempt of the protocol, as
  output slots of the rewrite requests; which attempt is kept is decided in the epoch (the label
  check needs that epoch's reward model).

An epoch that needs more than the bank holds (a pair given more paraphrases than the bank's
``paraphrases``, the paraphrases of a refined pair) generates on the first miss; every epoch's
``augment_summary.json`` reports the bank's hits, misses and generations.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mars_ray.config import Config
from mars_ray.core import schema as S
from mars_ray.core.atomic import write_json

MANIFESTS = "bank"  # folder of build manifests inside the cache directory


def paraphrases_per_text(cfg: Config, n_pairs: int) -> int:
    """``bank.paraphrases``, or what uniform allocation of ``mars.budget`` needs per response + 1."""
    if cfg.bank.paraphrases is not None:
        return int(cfg.bank.paraphrases)
    return int(math.ceil(cfg.mars.budget / max(1, n_pairs) / 2)) + 1


def build_bank(
    cfg: Config, pairs: pa.Table | None = None, *, run_pairs: int | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Fill the generation cache for ``pairs`` (default: the training split of ``cfg.data``);
    ``run_pairs``: the training pairs of one run, for the default ``bank.paraphrases`` (default:
    all of ``pairs``). Returns the build's manifest (also written under ``model.cache_dir/bank/``)."""
    from mars_ray.core.semantic import semantic_labels
    from mars_ray.models.resolve import cache_root
    from mars_ray.runtime import init_ray
    from mars_ray.stages.common import map_with_actors
    from mars_ray.stages.embed import semantic_distances
    from mars_ray.stages.generate import (
        STAT_COLUMNS,
        ParaphraseActor,
        RefineActor,
        longest_first,
        paraphrase_actor_kwargs,
        refine_actor_kwargs,
    )

    t0 = time.perf_counter()
    if cfg.bank.actors is not None:  # the bank's own pool size (its stages only)
        cfg = cfg.copy({"resources.actors": int(cfg.bank.actors)})
    if pairs is None:
        from mars_ray.data.load import read_preferences

        table = read_preferences(cfg.data, seed=cfg.seed).table
        pairs = table.filter(pc.equal(table.column(S.SPLIT), "train"))
    from mars_ray.generation.cache import choose_backend

    choose_backend(cache_root(cfg.model.cache_dir), cfg.model.cache_backend)  # before any actor opens it
    init_ray(cfg.resources)
    k = paraphrases_per_text(cfg, run_pairs or pairs.num_rows)
    texts = sorted(set(pairs.column(S.CHOSEN).to_pylist()) | set(pairs.column(S.REJECTED).to_pylist()))
    manifest: dict[str, Any] = {
        "data": cfg.data.path,
        "pairs": pairs.num_rows,
        "texts": len(texts),
        "paraphrases_per_text": k,
        "paraphrase_generator": f"{cfg.paraphrase.backend}:{cfg.paraphrase.model}",
        "rewrite_generator": f"{cfg.rewrite.backend}:{cfg.rewrite.model}",
    }

    def counts(out: pa.Table) -> dict[str, int]:
        return {c.removeprefix("gen_"): int(np.sum(out.column(c).to_numpy())) for c in STAT_COLUMNS}

    if k > 0 and texts:
        log(f"[bank] paraphrases: {len(texts)} responses x {k} gated candidates ...")
        req = longest_first(
            pa.table({"key": [str(i) for i in range(len(texts))], "text": texts, "n": [k] * len(texts)})
        )
        kwargs = paraphrase_actor_kwargs(cfg)
        out = map_with_actors(
            req,
            ParaphraseActor,
            kwargs,
            resources=cfg.resources,
            batch_size=cfg.paraphrase.batch(cfg.resources.gpus_per_actor),
        )
        kept = [len(json.loads(x)) for x in out.column("kept").to_pylist()]
        manifest["paraphrase"] = {
            **counts(out),
            "texts_full": int(sum(1 for x in kept if x >= k)),
            "kept": int(sum(kept)),
        }
    if cfg.bank.rewrites and cfg.semantic.active(cfg.rewrite.model) and pairs.num_rows:
        dist = semantic_distances(pairs, cfg).column("distance").to_numpy()
        low, threshold = semantic_labels(np.asarray(dist, dtype=np.float64), cfg.semantic.threshold)
        idx = np.flatnonzero(low)
        log(f"[bank] rewrites: {idx.size} low-distance pairs (threshold {threshold:.3f}) ...")
        if idx.size:
            sub = pairs.take(pa.array(idx)).select([S.PAIR_ID, S.PROMPT, S.CHOSEN, S.REJECTED])
            sub = sub.append_column("distance", pa.array(np.asarray(dist, dtype=np.float64)[idx]))
            kwargs = refine_actor_kwargs(cfg)  # no scorer: which attempt is kept is decided in the epoch
            out = map_with_actors(
                sub,
                RefineActor,
                kwargs,
                resources=cfg.resources,
                batch_size=cfg.rewrite.batch(cfg.resources.gpus_per_actor),
            )
            manifest["rewrite"] = {**counts(out), "pairs": int(idx.size)}
    manifest["seconds"] = round(time.perf_counter() - t0, 1)
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    d = cache_root(cfg.model.cache_dir) / MANIFESTS
    d.mkdir(parents=True, exist_ok=True)
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.hash()}.json"
    write_json(d / name, manifest)
    log(
        f"[bank] done in {manifest['seconds']:.0f}s: "
        + json.dumps({k: manifest.get(k) for k in ("paraphrase", "rewrite")})
    )
    return manifest


def inspect_bank(cache_dir: str | None) -> dict[str, Any]:
    """What a cache directory's bank holds: entries per generator and the build manifests."""
    import sqlite3

    from mars_ray.generation.cache import BACKEND_FILE, SHARDS_DIR, SQLITE_FILE, ShardedCache
    from mars_ray.models.resolve import cache_root

    root = cache_root(cache_dir)
    db = root / SQLITE_FILE
    out: dict[str, Any] = {"cache": str(root), "entries": 0, "by_generator": {}, "builds": []}
    marker = root / BACKEND_FILE
    out["backend"] = marker.read_text(encoding="utf-8").strip() if marker.exists() else "sqlite"
    if out["backend"] == "shards":
        shards = ShardedCache(root / SHARDS_DIR)
        out["by_generator"] = dict(sorted(shards.by_model().items(), key=lambda kv: -kv[1]))
        out["entries"] = int(sum(out["by_generator"].values()))
        out["bytes"] = sum(f.stat().st_size for f in (root / SHARDS_DIR).glob("shard-*.jsonl"))
        out["shards"] = len(list((root / SHARDS_DIR).glob("shard-*.jsonl")))
    elif db.exists():
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = con.execute("SELECT model, COUNT(*) FROM gen GROUP BY model ORDER BY 2 DESC").fetchall()
        finally:
            con.close()
        out["by_generator"] = {m or "?": int(c) for m, c in rows}
        out["entries"] = int(sum(c for _, c in rows))
        out["bytes"] = db.stat().st_size
    for f in sorted((root / MANIFESTS).glob("*.json")) if (root / MANIFESTS).is_dir() else []:
        out["builds"].append({"file": f.name, **json.loads(f.read_text(encoding="utf-8"))})
    return out


def bank_counts(generation: dict[str, int]) -> dict[str, int]:
    """An epoch's generation counters (``paraphrase_hits``, ``rewrite_requested``, ...) as the
    bank's hits, misses and generations over every operation."""
    ops = {k.rsplit("_", 1)[0] for k in generation}
    req = sum(int(generation.get(f"{o}_requested", 0)) for o in ops)
    hits = sum(int(generation.get(f"{o}_hits", 0)) for o in ops)
    return {
        "requested": req,
        "hits": hits,
        "misses": req - hits,
        "generated": sum(int(generation.get(f"{o}_generated", 0)) for o in ops),
        "failed": sum(int(generation.get(f"{o}_failed", 0)) for o in ops),
        # cached outputs that failed their checksum: dropped and generated again
        "corrupt": sum(int(generation.get(f"{o}_corrupt", 0)) for o in ops),
    }
