"""Gradio web demo of the dass package (``dass-demo`` or ``python app/app.py``).

The clone's ``app/`` folder; a wheel installs it as the package ``dass_demo``, so imports inside it are relative."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """``dass-demo``: without the ``demo`` extra (Gradio) one line naming it and exit 1, else serve the demo.

    The check comes before the ``app`` module is imported, since that module imports Gradio at its top."""
    from dass_train.extras import MISSING_EXTRA_EXIT, missing_extra

    message = missing_extra("dass-demo", "demo")
    if message:
        print(message, file=sys.stderr)
        return MISSING_EXTRA_EXIT
    from .app import main as serve

    return serve(argv)
