"""``dass-train`` and ``python -m dass_train`` (what ``torchrun --nproc_per_node=N -m dass_train PRESET`` runs).

Checks for the ``train`` extra before importing the CLI: a runtime-only install (``pip install dass``) then gets one
line naming the extra, not an ``ImportError`` traceback from the CLI's imports.
"""

import sys

from dass_train.extras import MISSING_EXTRA_EXIT, missing_extra


def main() -> int:
    message = missing_extra("dass-train", "train")
    if message:
        print(message, file=sys.stderr)
        return MISSING_EXTRA_EXIT
    from dass_train.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
