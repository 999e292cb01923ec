"""mars_ray: MARS (margin- and semantic-aware data augmentation for reward modeling) on Ray.

The package is layered so that importing it is cheap:

- ``mars_ray.config``: the one typed configuration that flows through every stage.
- ``mars_ray.core``: pure Python/NumPy algorithm code (never imports ray).
- ``mars_ray.data``: preference-data readers, validation with quarantine, splits.
- ``mars_ray.models``: model resolution (hub ids, local paths, built-in offline models).
- ``mars_ray.cli``: the ``mars-ray`` command.
"""

__version__ = "0.1.0"

from mars_ray.config import Config  # noqa: E402  (cheap: dataclasses only)

__all__ = ["Config", "__version__"]
