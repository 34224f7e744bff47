"""What the three click commands (``dass-segment``, ``dass-export``, ``dass-demo``) share: exit codes, the
argparse-style ``*_main(argv)`` contract, and SIGTERM handled like Ctrl-C.

Exit codes: 0 ok, 1 some inputs failed, 2 usage or setup error, 130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn

import rich_click as click

OK, SOME_FAILED, USAGE, INTERRUPTED, TERMINATED = 0, 1, 2, 130, 143

click.rich_click.TEXT_MARKUP = None  # help texts are plain: brackets like [N,3,H,W] are not rich markup
click.rich_click.SHOW_ARGUMENTS = True
click.rich_click.MAX_WIDTH = 110


class Finished(SystemExit):
    """Raised by a command when its run is over: click lets a ``SystemExit`` through in standalone mode, so the
    console script exits with this code, and ``run_command`` returns it."""


def finish(code: int) -> NoReturn:
    raise Finished(code)


def fail(message: str) -> NoReturn:
    """A setup error: one line on stderr, exit 2."""
    click.echo(f"error: {message}", err=True)
    raise Finished(USAGE)


def run_command(command: click.Command, argv: Sequence[str] | None, prog_name: str) -> int:
    """Run ``command`` as its console script would, but return the run's exit status instead of exiting.

    Like argparse, ``--help``, shell completion and usage errors still end in ``SystemExit`` (code 0 or 2), with
    click's usage message on stderr. ``argv`` is also handed to the command as ``ctx.obj["argv"]``.
    """
    args = list(argv) if argv is not None else sys.argv[1:]
    try:
        command.main(args=args, prog_name=prog_name, standalone_mode=True, obj={"argv": args})
    except Finished as done:
        return int(done.code or 0)
    return OK  # not reached: click always exits in standalone mode


class Signals:
    """SIGTERM becomes a KeyboardInterrupt while a command runs, so every Ctrl-C path (close the video, print the
    summary) also runs for ``kill``; ``exit_code`` then says which of the two it was. A context manager: the previous
    handler comes back afterwards (a command run inside a test process leaves that process as it was)."""

    def __init__(self) -> None:
        self.terminated = False
        self._previous: object = None

    def __enter__(self) -> Signals:
        def on_term(signum: int, frame: object) -> None:
            self.terminated = True
            raise KeyboardInterrupt

        try:
            self._previous = signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread (e.g. a server's worker): nothing to install
            self._previous = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)  # type: ignore[arg-type]

    @property
    def exit_code(self) -> int:
        return TERMINATED if self.terminated else INTERRUPTED


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while one input's outputs are written, so an interrupt never leaves some of
    them on disk and the rest missing (a rerun would then stop at "exists"); delivered right after."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
