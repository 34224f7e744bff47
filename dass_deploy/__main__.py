"""``python -m dass_deploy ...`` runs ``dass-segment``."""

import sys

from dass_deploy.cli import segment_main

sys.exit(segment_main())
