"""Ray Data wiring: each stage is a class whose ``__init__`` loads its model once per actor and
whose ``__call__(batch)`` processes one batch. Algorithm code lives in :mod:`mars_ray.core`."""
