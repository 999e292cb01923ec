"""Ray Data wiring only: one actor class per stage (score, embed, refine, paraphrase, West-of-N),
whose ``__init__`` loads its model once per actor and whose ``__call__(batch)`` processes one batch.

Algorithm code lives in :mod:`mars_ray.core`, generators in :mod:`mars_ray.generation`, models in
:mod:`mars_ray.models`; stages may import those, :mod:`mars_ray.config` and :mod:`mars_ray.runtime`.
"""
