"""mars_ray: MARS (margin- and semantic-aware data augmentation for reward modeling) on Ray.

Layers, lowest first (a layer imports only the ones before it; ``docs/architecture.md`` has the map):

- ``config``: the one typed configuration that flows through every stage;
- ``core``: pure algorithm code (allocation, semantic distance, gates, refinement, losses, metrics); never Ray;
- ``models``: model resolution (hub ids, local paths, ``builtin:*``) and reward models;
- ``generation``: text generators (local, seq2seq, OpenAI-compatible), their cache, prompt templates;
- ``data``: preference-data readers, validation with quarantine, splits;
- ``runtime``, ``stages``, ``train``, ``serve``: Ray start-up, Ray Data stages, Ray Train, Ray Serve;
- ``augment``, ``pipeline``, ``evaluate``, ``experiments``, ``rl``, ``cli``: the commands.

Importing the package is cheap: heavy libraries load inside the functions that need them.
"""

__version__ = "0.1.0"

from mars_ray.config import Config

__all__ = ["Config", "__version__"]
