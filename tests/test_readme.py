"""The README is short, and every command it shows is one the project has: a make target of the Makefile, an extra of
pyproject.toml, a script in the clone, and for the four console scripts options their command takes. A renamed
option or target fails here rather than in a newcomer's terminal. The quick start itself runs in test_install.py."""

from __future__ import annotations

import re
import shlex
from importlib.metadata import metadata

import click
from conftest import REPO

README = REPO / "README.md"


def readme_commands() -> list[list[str]]:
    """Every command line of the README's ``bash`` blocks, comments dropped, ``a && b`` split in two."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:cut])
                words = words[cut + 1 :]
    return commands


def console_commands() -> dict[str, click.Command]:
    from app.app import demo_command
    from dass_deploy.cli import segment
    from dass_deploy.cli_export import export
    from dass_train.cli import cli

    return {"dass-segment": segment, "dass-export": export, "dass-demo": demo_command, "dass-train": cli}


def options(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts) if opt.startswith("-")}


def check_console(name: str, args: list[str]) -> None:
    command = console_commands()[name]
    if isinstance(command, click.Group):  # dass-train: a subcommand, or a preset (short for `run PRESET`)
        sub = args[0] if args and args[0] in command.commands else "run"
        args = args[1:] if sub == args[0] else args
        command = command.commands[sub]
    for word in args:
        if word.startswith("-"):
            assert word.split("=")[0] in options(command) | {"-h", "--help"}, f"{name}: no option {word}"
        elif word.startswith(("app/", "benchmarks/", "docs/")):
            assert (REPO / word).exists(), f"{name}: {word} is not in the clone"


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 200


def test_every_readme_command_exists():
    extras = set(metadata("dass").get_all("Provides-Extra"))
    targets = set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), re.M))
    seen = set()
    for words in readme_commands():
        program, args = words[0], words[1:]
        seen.add(program)
        if program in console_commands():
            check_console(program, args)
        elif program == "pip":
            assert args[0] == "install"
            for spec in args[1:]:
                match = re.fullmatch(r"(\.|dass)(?:\[([a-z,]+)\])?|torch==2\.13\.0", spec)
                assert match, f"pip install {spec}: not the package, one of its extras or the CPU torch"
                assert set((match.group(2) or "").split(",")) - {""} <= extras, f"no extra in {spec}"
        elif program == "make":
            assert set(args) <= targets, f"make {args}: no such target"
        elif program in ("python", "bash"):
            assert (REPO / args[0]).is_file(), f"{program} {args[0]}: no such script"
        else:
            assert program == ".venv/bin/python" and args[:2] == ["-m", "pytest"], f"unknown command {words}"
    assert {"dass-segment", "dass-export", "dass-demo", "dass-train", "make", "pip"} <= seen
