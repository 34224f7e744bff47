"""Print the description every benchmark result records (CPU model, cores, ISA flags, versions, thread env).

    python benchmarks/machine.py

The implementation lives in ``dass_deploy.machine`` so that ``dass-segment --benchmark`` (installed package) records
the same description; this script and the benchmark scripts import it from there. Torch-free.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dass_deploy.machine import describe_machine, machine_key, machine_markdown  # noqa: E402

__all__ = ["describe_machine", "machine_key", "machine_markdown"]

if __name__ == "__main__":
    machine = describe_machine()
    print(json.dumps(machine, indent=1))
    print(machine_markdown(machine))
