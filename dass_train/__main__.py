"""``python -m dass_train`` (what ``torchrun --nproc_per_node=N -m dass_train PRESET`` runs)."""

import sys

from dass_train.cli import main

sys.exit(main())
