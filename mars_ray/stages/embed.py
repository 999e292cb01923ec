"""Semantic distances between chosen and rejected responses, on a Ray Data actor pool."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from mars_ray.config import Config
from mars_ray.core.semantic import cosine_distance
from mars_ray.stages.common import actor_threads, as_list, map_with_actors, set_threads


class Encoder:
    """A sentence-transformer loaded once; ``distances`` and ``similarity`` in batches."""

    def __init__(
        self,
        model_ref: str,
        *,
        batch_size: int = 64,
        num_threads: int | None = None,
        device: str | None = None,
        cache_dir: str | None = None,
    ):
        from mars_ray.models import load_sentence_encoder
        from mars_ray.runtime import pick_device

        set_threads(num_threads)
        self.device = pick_device(device)
        self.model = load_sentence_encoder(model_ref, device=self.device)
        self.batch_size = batch_size

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 1), dtype=np.float32)
        return self.model.encode(
            texts, batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )

    def distances(self, a: list[str], b: list[str]) -> np.ndarray:
        """1 - cos(a_i, b_i), one encode call for both sides."""
        e = self.embed(list(a) + list(b))
        return cosine_distance(e[: len(a)], e[len(a) :])

    def similarity(self, a: list[str], b: list[str]) -> np.ndarray:
        return 1.0 - self.distances(a, b)


class EmbedActor:
    """Ray Data actor: chosen/rejected -> semantic distance per pair."""

    def __init__(self, model_ref: str, batch_size: int, num_threads: int | None = None):
        self.encoder = Encoder(model_ref, batch_size=batch_size, num_threads=num_threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        d = self.encoder.distances(as_list(batch["chosen"]), as_list(batch["rejected"]))
        return {"pair_id": batch["pair_id"], "distance": d.astype(np.float64)}


def semantic_distances(table: pa.Table, cfg: Config) -> pa.Table:
    """(pair_id, distance) for every row of ``table``, computed on ``resources.actors`` actors."""
    kwargs = {
        "model_ref": cfg.model.encoder,
        "batch_size": cfg.semantic.batch_size,
        "num_threads": actor_threads(cfg.resources),
    }
    return map_with_actors(
        table.select(["pair_id", "chosen", "rejected"]),
        EmbedActor,
        kwargs,
        resources=cfg.resources,
        batch_size=cfg.semantic.batch_size,
    )
