"""Disk size of the two installs the README compares, measured with ``du``: the runtime (``pip install dass``, the
wheel without extras, in a fresh venv) and the full development venv (``make setup``: torch and every CPU extra).

    python benchmarks/install_size.py [--full-venv .venv] [--work DIR]

Builds the wheel and the sdist with ``python -m build --no-isolation`` (from the sdist, as a package index would),
installs the wheel into a fresh venv, and writes ``benchmarks/results/install_size.{md,json}`` with the command and
the machine. ``tests/test_install.py`` builds and installs with these same functions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def build(out: Path, repo: Path = REPO) -> tuple[Path, Path, str]:
    """``python -m build``: the sdist, then the wheel built from it; returns (wheel, sdist, the build's output)."""
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(repo)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"python -m build failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return wheel, sdist, proc.stdout + proc.stderr


def make_venv(path: Path, *requirements: str) -> Path:
    """A fresh venv at ``path`` with ``requirements`` installed by pip (nothing else); returns its ``bin/``."""
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    bin_dir = path / "bin"
    if requirements:
        subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", *requirements], check=True)
    return bin_dir


def du_mib(path: Path) -> float:
    """``du -sk``: what the folder takes on disk, in MiB."""
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) / 1024


def pip_count(bin_dir: Path) -> int:
    """How many distributions the venv holds (pip's own list)."""
    out = subprocess.run([str(bin_dir / "python"), "-m", "pip", "list", "--format=json"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return len(json.loads(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full-venv", type=Path, default=REPO / ".venv", help="the venv `make setup` made (default .venv)")
    p.add_argument("--work", type=Path, help="where to build and install (default: a temporary folder)")
    args = p.parse_args(argv)
    if not (args.full_venv / "bin" / "python").is_file():
        p.error(f"--full-venv {args.full_venv}: no venv there (run make setup)")
    sys.path.insert(0, str(REPO))
    from dass_deploy.machine import describe_machine, machine_markdown

    with tempfile.TemporaryDirectory(prefix="dass-install-size-") as tmp:
        work = args.work or Path(tmp)
        wheel, sdist, _ = build(work / "dist")
        runtime = make_venv(work / "runtime", str(wheel)).parent
        rows = [
            {"install": "runtime: pip install dass (the wheel, no extras)", "venv_mib": du_mib(runtime),
             "distributions": pip_count(runtime / "bin")},
            {"install": "full: make setup (torch==2.13.0 CPU, then -e '.[test]': every CPU extra)",
             "venv_mib": du_mib(args.full_venv), "distributions": pip_count(args.full_venv / "bin")},
        ]  # fmt: skip
        files = {"wheel_mib": wheel.stat().st_size / 2**20, "sdist_mib": sdist.stat().st_size / 2**20}
    command = "python benchmarks/install_size.py " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = describe_machine()
    payload = {"command": command.strip(), "machine": machine, "rows": rows, **files}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "install_size.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [
        "# Install size",
        "",
        f"`{payload['command']}` (venv sizes by `du -sk`; Python {sys.version.split()[0]})",
        "",
        machine_markdown(machine),
        "",
        "| install | venv size (MiB) | distributions |",
        "|---|---:|---:|",
        *(f"| {r['install']} | {r['venv_mib']:.0f} | {r['distributions']} |" for r in rows),
        "",
        f"Wheel {files['wheel_mib']:.1f} MiB (the bundled default model is most of it), sdist {files['sdist_mib']:.1f} MiB.",
    ]
    (RESULTS / "install_size.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
