"""dass runtime side: export, runtimes, segmentation CLI. Imports no torch unless asked to."""

__version__ = "0.1.0"
