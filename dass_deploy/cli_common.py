"""What the three click commands (``dass-segment``, ``dass-export``, ``dass-demo``) share: exit codes, the
argparse-style ``*_main(argv)`` contract, and SIGTERM handled like Ctrl-C.

Exit codes: 0 ok, 1 some inputs failed or a needed extra is not installed, 2 usage or setup error, 130 Ctrl-C,
143 SIGTERM.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn

import rich_click as click

from dass_deploy.adapt_frames import DEFAULT_ADAPT_FRAMES, DEFAULT_ADAPT_PASSES, MIN_ADAPT_FRAMES
from dass_train.extras import MISSING_EXTRA_EXIT, missing_extra

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


def require_extra(command: str, extra: str) -> None:
    """A run that needs an extra which is not installed: the one line naming it (``pip install 'dass[...]'``), exit
    1, before anything is loaded or written."""
    message = missing_extra(command, extra)
    if message:
        click.echo(message, err=True)
        raise Finished(MISSING_EXTRA_EXIT)


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
    """Ctrl-C and SIGTERM while a command runs: both raise ``KeyboardInterrupt`` in the main thread, so every Ctrl-C
    path (close the video, print the summary) also runs for ``kill``; ``exit_code`` says which it was (130 / 143).

    A context manager: the previous handlers come back afterwards. ``deferred()`` holds an interrupt back while one
    input's outputs are written, and raises it right after: Python runs signal handlers in the main thread only,
    so this holds whichever thread the OS delivered the signal to (a signal mask would not: ONNX Runtime's and
    the pipeline's threads would still take it).
    """

    def __init__(self) -> None:
        self.terminated = False
        self._previous: dict[int, object] = {}
        self._deferring = False
        self._pending = False

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGTERM:
            self.terminated = True
        if self._deferring:
            self._pending = True
            return
        raise KeyboardInterrupt

    def __enter__(self) -> Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            current = signal.getsignal(sig)
            if sig == signal.SIGINT and current is not signal.default_int_handler:
                continue  # ignored (started in the background with `&`) or the caller's own: leave it
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. a server's worker): nothing to install
                break
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold Ctrl-C / SIGTERM back inside the block (all of an image's outputs, or none: a half-written set
        would stop a rerun at "exists"); an interrupt that came meanwhile is raised on leaving it."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
            if self._pending:
                self._pending = False
                raise KeyboardInterrupt

    @property
    def exit_code(self) -> int:
        return TERMINATED if self.terminated else INTERRUPTED


#: ``--adapt-frames`` of dass-segment and dass-export (both adapt BN statistics with ``dass_deploy.adapt_bn``).
adapt_frames_option = click.option(
    "--adapt-frames",
    type=click.IntRange(min=MIN_ADAPT_FRAMES),
    default=None,
    metavar="N",
    help=f"--adapt-bn: use at most N frames, spread evenly over SOURCE (minimum {MIN_ADAPT_FRAMES}). "
    f"[default: {DEFAULT_ADAPT_FRAMES}]",
)


#: ``--adapt-passes``: the passes of the population estimate (``dass_train.bn_statistics``).
class _Passes(click.ParamType):
    """A count of passes (>= 1) or ``exact`` (0: until a pass changes nothing)."""

    name = "passes"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text == "exact":
            return 0
        if text.isdigit() and int(text) >= 1:
            return int(text)
        self.fail(f"{value!r} is not a number of passes (1, 2, ...) or 'exact'", param, ctx)


adapt_passes_option = click.option(
    "--adapt-passes",
    type=_Passes(),
    default=None,
    metavar="P|exact",
    help="--adapt-bn: passes over the frames, each a forward pass per frame. 1: the statistics pooled over all "
    "frames while each frame is normalised by its own (AdaBN); exact: repeated in eval mode until nothing changes "
    "(at most one pass per BatchNorm layer), the statistics inference meets. Counts in between are worse than "
    f"either (docs/ADAPT_BN.md). [default: {DEFAULT_ADAPT_PASSES}]",
)


def adapt_frames_value(adapt_bn: str | None, adapt_frames: int | None) -> int:
    """``--adapt-frames`` or its default; given without ``--adapt-bn`` it is a usage error."""
    if adapt_frames is not None and adapt_bn is None:
        raise click.UsageError("--adapt-frames is only used with --adapt-bn SOURCE")
    return DEFAULT_ADAPT_FRAMES if adapt_frames is None else adapt_frames


def adapt_passes_value(adapt_bn: str | None, adapt_passes: int | None) -> int:
    """``--adapt-passes`` or its default; given without ``--adapt-bn`` it is a usage error."""
    if adapt_passes is not None and adapt_bn is None:
        raise click.UsageError("--adapt-passes is only used with --adapt-bn SOURCE")
    return DEFAULT_ADAPT_PASSES if adapt_passes is None else adapt_passes
