"""dass training backend: BiDA (ECCV 2022) for domain adaptive semantic segmentation.

Kept import-light: ``dass_train.labels`` and ``dass_train.metrics`` are torch-free and are
used by the runtime side.
"""

__version__ = "0.1.0"
