"""Mutation check of the BiDA step's wiring: each mutant of dass_train/losses.py must fail tests/test_losses.py.

    python tools/wiring_mutants.py        # prints one line per mutant; exit 1 if a mutant survives

The file is restored afterwards (also on Ctrl-C).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "dass_train" / "losses.py"
FCL = "weights.fcl * bida.contrastive_loss(f_t, y_t, rho_s, pres_s, weights.tau)"
BCL = "weights.bcl * bida.contrastive_loss(f_s, y_s, rho_t, pres_t, weights.tau)"
MUTANTS = {
    "FCL and BCL with the domains swapped": [
        (FCL, "@FCL@"),
        (BCL, FCL.replace("fcl", "bcl")),
        ("@FCL@", BCL.replace("bcl", "fcl")),
    ],
    "rho_T from static instead of hybrid labels": [("prototypes(f_t, y_t)", "prototypes(f_t, y_f)")],
    "calibration applied to the target side": [
        ("dynamic(memory.calibrate(rho_s.detach()))", "dynamic(rho_s.detach() - memory.bias())")
    ],
    "calibration left out": [("dynamic(memory.calibrate(rho_s.detach()))", "dynamic(rho_s.detach())")],
    "EMA updated from the wrong domain": [
        (
            "memory.update(rho_s_batch, pres_s_batch, rho_t_batch, pres_t_batch)",
            "memory.update(rho_t_batch, pres_t_batch, rho_s_batch, pres_s_batch)",
        )
    ],
}


def main() -> int:
    original = TARGET.read_text()
    survivors = 0
    try:
        for name, edits in MUTANTS.items():
            text = original
            for old, new in edits:
                if old not in text:
                    raise SystemExit(f"mutant '{name}': '{old}' is no longer in {TARGET}; update this script")
                text = text.replace(old, new, 1)
            TARGET.write_text(text)
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    str(REPO / "tests" / "test_losses.py"),
                ],
                capture_output=True,
                text=True,
                cwd=REPO,
            )
            killed = proc.returncode != 0
            survivors += not killed
            print(f"{'killed ' if killed else 'SURVIVED'}  {name}: {proc.stdout.strip().splitlines()[-1]}")
    finally:
        TARGET.write_text(original)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
