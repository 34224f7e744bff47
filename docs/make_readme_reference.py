"""Fill README.md's "Command reference" with the four commands' top-level ``--help``, from the commands themselves.

    python docs/make_readme_reference.py          # rewrite the block between the markers in README.md
    python docs/make_readme_reference.py --check  # exit 1 if README.md's block is stale

Subcommands and every option: docs/CLI.md (make_cli_reference.py) and docs/CLI_TRAIN.md (make_cli_train_reference.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "docs"))
README = REPO / "README.md"
START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"


def render() -> str:
    from make_cli_reference import commands
    from make_cli_train_reference import _help

    blocks = [("dass-train", _help([]).rstrip("\n"))]
    from click.testing import CliRunner

    for name, command in commands():
        result = CliRunner().invoke(
            command, ["--help"], prog_name=name, terminal_width=100, env={"COLUMNS": "100", "NO_COLOR": "1"}
        )
        if result.exit_code != 0:
            raise SystemExit(f"{name} --help failed: {result.output}")
        blocks.append((name, "\n".join(line.rstrip() for line in result.output.strip("\n").splitlines())))
    parts = [START, ""]
    for name, text in blocks:
        parts += [
            f"<details><summary><code>{name} --help</code></summary>",
            "",
            "```text",
            text,
            "```",
            "",
            "</details>",
            "",
        ]
    parts.append(END)
    return "\n".join(parts)


def updated(readme: str) -> str:
    a, b = readme.index(START), readme.index(END) + len(END)
    return readme[:a] + render() + readme[b:]


def main(argv: list[str]) -> int:
    text = README.read_text()
    new = updated(text)
    if "--check" in argv:
        if new != text:
            print(
                "README.md's command reference is out of date: run python docs/make_readme_reference.py",
                file=sys.stderr,
            )
            return 1
        return 0
    README.write_text(new)
    print(f"wrote {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
