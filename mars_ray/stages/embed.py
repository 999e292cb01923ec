"""Semantic distances between chosen and rejected responses, on a Ray Data actor pool."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import numpy as np
import pyarrow as pa

from mars_ray.config import Config
from mars_ray.core.semantic import cosine_distance
from mars_ray.stages.common import actor_threads, as_list, map_with_actors, set_threads


class Encoder:
    """A sentence-transformer loaded once; ``distances`` and ``similarity`` in batches.

    ``embed`` encodes each distinct text once per call. With ``cache`` (``model.cache_dir``'s
    embedding store, :func:`mars_ray.generation.cache.embedding_cache`) embeddings are kept by
    (encoder, text): the gate's sources and candidates are embedded once for every epoch,
    strategy and trial, as the generation bank keeps their generations. A cached vector equals a
    fresh one to float32 rounding (batch composition moves the last bits)."""

    def __init__(
        self,
        model_ref: str,
        *,
        batch_size: int = 64,
        dtype: str = "auto",
        num_threads: int | None = None,
        device: str | None = None,
        cache_dir: str | None = None,
        cache: bool = False,
    ):
        from mars_ray.models import load_sentence_encoder
        from mars_ray.models.precision import inference_dtype
        from mars_ray.runtime import pick_device

        set_threads(num_threads)
        self.device = pick_device(device)
        self.model = load_sentence_encoder(model_ref, device=self.device)
        # The precision policy (model.dtype): bf16 where native. MiniLM on 400 HH pairs: 1.85x
        # faster, distances within 0.0054 of fp32 (correlation 0.99998), no pair crossed the mean.
        self.dtype = inference_dtype(dtype, self.device)
        self.model.to(self.dtype)
        self.batch_size = batch_size
        self.model_ref = str(model_ref)
        # fp32 vectors keep the key they always had; another dtype's vectors are stored apart.
        self._key_prefix = f"embed\0{self.model_ref}\0" + (
            "" if str(self.dtype) == "torch.float32" else f"{str(self.dtype).removeprefix('torch.')}\0"
        )
        # A stored vector is used only at this size; an encoder that does not report it is not cached.
        # (sentence-transformers 5.x names it get_sentence_embedding_dimension; 6.x renamed it.)
        dim_of = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = dim_of()
        self.store = None
        if cache and self.dim:
            from mars_ray.generation.cache import embedding_cache

            self.store = embedding_cache(cache_dir)
        self.stats = {"hits": 0, "encoded": 0}

    def _key(self, text: str) -> str:
        blob = f"{self._key_prefix}{text}".encode("utf-8", "surrogatepass")
        return hashlib.sha256(blob).hexdigest()

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 1), dtype=np.float32)
        uniq = list(dict.fromkeys(texts))
        vecs: dict[str, np.ndarray] = {}
        keys = {t: self._key(t) for t in uniq} if self.store is not None else {}
        if self.store is not None:
            got = self.store.get_many(list(keys.values()))
            for t, k in keys.items():
                if k in got:
                    v = np.frombuffer(base64.b64decode(got[k]), dtype=np.float32)
                    if v.size == self.dim:  # another size: another encoder under this ref, re-encoded
                        vecs[t] = v
        missing = [t for t in uniq if t not in vecs]
        if missing:
            enc = self.model.encode(
                missing,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            ).astype(np.float32)
            for t, e in zip(missing, enc):
                vecs[t] = e
            if self.store is not None:
                self.store.put_many(
                    [(keys[t], base64.b64encode(vecs[t].tobytes()).decode("ascii")) for t in missing],
                    model=f"embed:{self.model_ref}",
                )
        self.stats["hits"] += len(uniq) - len(missing)
        self.stats["encoded"] += len(missing)
        return np.stack([vecs[t] for t in texts])

    def distances(self, a: list[str], b: list[str]) -> np.ndarray:
        """1 - cos(a_i, b_i), one encode call for both sides."""
        e = self.embed(list(a) + list(b))
        return cosine_distance(e[: len(a)], e[len(a) :])

    def similarity(self, a: list[str], b: list[str]) -> np.ndarray:
        return 1.0 - self.distances(a, b)


def encoder_settings(cfg: Config) -> dict[str, Any]:
    """The sentence encoder as :class:`Encoder` keyword arguments (plain values, for actors)."""
    return {"model_ref": cfg.model.encoder, "batch_size": cfg.semantic.batch_size, "dtype": cfg.model.dtype}


class EmbedActor:
    """Ray Data actor: chosen/rejected -> semantic distance per pair."""

    def __init__(self, encoder: dict[str, Any], num_threads: int | None = None):
        self.encoder = Encoder(**encoder, num_threads=num_threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        d = self.encoder.distances(as_list(batch["chosen"]), as_list(batch["rejected"]))
        return {"pair_id": batch["pair_id"], "distance": d.astype(np.float64)}


def semantic_distances(table: pa.Table, cfg: Config) -> pa.Table:
    """(pair_id, distance) for every row of ``table``, computed on ``resources.actors`` actors."""
    kwargs = {"encoder": encoder_settings(cfg), "num_threads": actor_threads(cfg.resources)}
    return map_with_actors(
        table.select(["pair_id", "chosen", "rejected"]),
        EmbedActor,
        kwargs,
        resources=cfg.resources,
        batch_size=cfg.semantic.batch_size,
    )
