"""A content-hash cache in front of any :class:`~mars_ray.generation.base.TextGenerator`, and a
generator that loads its back end on the first cache miss.

The cache works in *slots*: output k of request r under (model id, generation params) is stored
under ``sha256(model_id, params, r, k)``. A request whose slots are all cached costs nothing, so a
rerun, a resumed epoch or a sweep trial with the same requests generates nothing again. The keys
are what makes the cache a bank shared by every epoch, strategy, seed and trial:

- deterministic decoding (temperature 0) never keys on the seed (:meth:`GenParams.key`), and beam
  search keys on the beams it really ran (``max(num_beams, n)``: beam k of a 3-beam search is not
  beam k of a 5-beam one), so what a slot holds never depends on which trial asked first;
- a sampled slot k is drawn from its own seed (request, k), so it is the same whatever batch it
  was generated in, and a request with slots 0..k-1 cached is continued from slot k.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mars_ray.generation.base import GenParams, Request, TextGenerator, request_caps


def request_key(model_id: str, params: GenParams, request: Request, slot: int) -> str:
    blob = json.dumps([model_id, params.key(), request, slot], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


class GenerationCache:
    """An on-disk key -> text store (SQLite, safe for several processes on one machine).

    On a multi-node cluster point ``model.cache_dir`` at shared storage to share it across nodes.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as c:
            c.execute("PRAGMA journal_mode=WAL")
            c.execute(
                "CREATE TABLE IF NOT EXISTS gen (key TEXT PRIMARY KEY, text TEXT NOT NULL, model TEXT, created REAL)"
            )

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60)
            self._local.conn = conn
        return conn

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        conn = self._conn()
        for i in range(0, len(keys), 500):
            chunk = list(keys[i : i + 500])
            q = f"SELECT key, text FROM gen WHERE key IN ({','.join('?' * len(chunk))})"
            out.update(dict(conn.execute(q, chunk).fetchall()))
        return out

    def put_many(self, items: Sequence[tuple[str, str]], model: str = "") -> None:
        if not items:
            return
        now = time.time()
        with self._conn() as c:
            c.executemany(
                "INSERT OR REPLACE INTO gen (key, text, model, created) VALUES (?, ?, ?, ?)",
                [(k, t, model, now) for k, t in items],
            )

    def __len__(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM gen").fetchone()[0])

    def __getstate__(self) -> dict[str, Any]:  # picklable for Ray actors: reconnect on the other side
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        GenerationCache.__init__(self, state["path"])


class LazyGenerator:
    """A :class:`TextGenerator` whose back end is built on the first :meth:`generate` call.

    Behind a :class:`CachedGenerator`, a batch served wholly from the cache (a rerun, a resumed
    epoch, a sweep trial asking what another trial already generated) then never loads the model.
    ``model_id`` is known up front (it is part of every cache key). Copies made with other
    ``params`` (``CachedGenerator.with_params``, a caller setting ``params``) share the one built
    back end, which generates with each copy's own params.
    """

    def __init__(self, model_id: str, params: GenParams, build: Any) -> None:
        self.model_id = model_id
        self.params = params
        self._build = build
        # Shared by copies: the built back end, and one view of it per other params.
        self._built: list[TextGenerator] = []
        self._views: dict[GenParams, TextGenerator] = {}

    @property
    def loaded(self) -> bool:
        return bool(self._built)

    def backend(self) -> TextGenerator:
        """The built back end (built now if it was not)."""
        if not self._built:
            gen = self._build()
            if gen.model_id != self.model_id:
                raise ValueError(f"built generator id {gen.model_id!r} differs from the declared {self.model_id!r}")
            self._built.append(gen)
        return self._built[0]

    def generate(
        self,
        requests: Sequence[Request],
        n: int = 1,
        *,
        max_new_tokens: Sequence[int] | None = None,
        first_slot: int = 0,
    ) -> list[list[str | None]]:
        import copy

        gen = self.backend()
        if gen.params != self.params:
            if self.params not in self._views:
                view = copy.copy(gen)  # the same model and tokenizer, other decoding parameters
                view.params = self.params
                self._views[self.params] = view
            gen = self._views[self.params]
        kw: dict[str, Any] = {"first_slot": first_slot} if first_slot else {}
        if max_new_tokens is not None:
            kw["max_new_tokens"] = max_new_tokens
        return gen.generate(requests, n, **kw)


@dataclass
class CacheStats:
    requested: int = 0  # outputs asked for
    hits: int = 0  # served from the cache
    generated: int = 0  # produced by the back end (a partly cached request is generated whole)
    failed: int = 0  # back end returned None (not cached, retried on a later call)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class CachedGenerator:
    """A :class:`TextGenerator` behind a :class:`GenerationCache` (only successes are cached)."""

    inner: TextGenerator
    cache: GenerationCache | None
    stats: CacheStats = field(default_factory=CacheStats)

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def params(self) -> GenParams:
        return self.inner.params

    def generate(
        self,
        requests: Sequence[Request],
        n: int = 1,
        *,
        max_new_tokens: Sequence[int] | None = None,
        first_slot: int = 0,
    ) -> list[list[str | None]]:
        """As :meth:`TextGenerator.generate`; a request's cache key holds its own output cap (the
        params with ``max_new_tokens`` set to it), so what is cached never depends on which other
        requests shared its batch. ``first_slot``: slots ``first_slot ..`` (sampled decoding)."""
        sampled = self.params.temperature > 0
        if first_slot and not sampled:
            raise ValueError("first_slot needs sampled decoding (deterministic slots come from one search)")
        self.stats.requested += len(requests) * n
        caps = request_caps(self.params, len(requests), max_new_tokens)
        if self.cache is None or n == 0:
            outs = self._inner_generate(list(requests), n, caps, first_slot) if n else [[] for _ in requests]
            self._count(outs)
            return outs
        p = self.params
        if not sampled and max(p.num_beams, n) > 1:  # the beams this call really runs
            p = replace(p, num_beams=max(p.num_beams, n))
        by_cap: dict[int, GenParams] = {}
        for c in set(caps):
            by_cap[c] = p if c == p.max_new_tokens else replace(p, max_new_tokens=c)
        slots = range(first_slot, first_slot + n)
        keys = [[request_key(self.model_id, by_cap[c], r, k) for k in slots] for r, c in zip(requests, caps)]
        found = self.cache.get_many([k for ks in keys for k in ks])
        self.stats.hits += len(found)
        results: list[list[str | None]] = [[found.get(k) for k in ks] for ks in keys]
        # Deterministic: a request with any missing slot is generated again with the same n and only
        # the missing slots are filled (beam k of n is only defined within an n-beam search).
        # Sampled: slot k has its own seed, so a request is continued from its first missing slot.
        starts: dict[int, list[int]] = {}
        for i, row in enumerate(results):
            missing = [j for j, t in enumerate(row) if t is None]
            if missing:
                starts.setdefault(missing[0] if sampled else 0, []).append(i)
        new_items: list[tuple[str, str]] = []
        for start, todo in sorted(starts.items()):
            outs = self._inner_generate(
                [requests[i] for i in todo], n - start, [caps[i] for i in todo], first_slot + start
            )
            self._count(outs)
            for i, gen in zip(todo, outs):
                for j in range(min(n - start, len(gen))):
                    text = gen[j]
                    if results[i][start + j] is None and text is not None:
                        results[i][start + j] = text
                        new_items.append((keys[i][start + j], text))
        self.cache.put_many(new_items, model=self.model_id)
        return results

    def _inner_generate(
        self, requests: list[Request], n: int, caps: list[int], first_slot: int = 0
    ) -> list[list[str | None]]:
        kw: dict[str, Any] = {"first_slot": first_slot} if first_slot else {}
        if any(c != self.params.max_new_tokens for c in caps):
            kw["max_new_tokens"] = caps
        return self.inner.generate(requests, n, **kw)

    def with_params(self, **changes: Any) -> CachedGenerator:
        """The same loaded model / client, cache and counters with other decoding parameters
        (they are part of the cache key)."""
        import copy

        inner = copy.copy(self.inner)
        inner.params = replace(self.inner.params, **changes)
        return CachedGenerator(inner, self.cache, self.stats)

    def _count(self, outs: list[list[str | None]]) -> None:
        for row in outs:
            for t in row:
                if t is None:
                    self.stats.failed += 1
                else:
                    self.stats.generated += 1


def default_cache(cache_dir: str | None = None) -> GenerationCache:
    from mars_ray.models.resolve import cache_root

    return GenerationCache(cache_root(cache_dir) / "generations.sqlite")
