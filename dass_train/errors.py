"""User-facing errors: one-line messages naming the file or option; the CLIs print them without a traceback."""


class UserError(Exception):
    """A mistake the user can fix (missing file, bad option, corrupt input)."""


class DataError(UserError):
    """A dataset file or folder is missing or malformed."""


class CheckpointError(UserError):
    """A checkpoint or weight file is missing, corrupt or of an unexpected layout."""


class ConfigError(UserError):
    """A configuration value or command-line option is invalid."""


def user_message(exc: BaseException) -> str:
    """The one line a CLI prints for ``exc``.

    A DataLoader worker's exception reaches the main process re-raised by torch as the same type, but with a
    message of ``Caught DataError in DataLoader worker process 0.\\nOriginal Traceback ...``: the user's line is
    the last line of that traceback, after the exception's name. Any other message is cut to its first line.
    """
    text = str(exc)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        cls = type(exc)
        for name in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
            at = text.rfind(name)
            if at >= 0:
                text = text[at + len(name) :]
                break
    text = text.strip()
    return text.splitlines()[0] if text else type(exc).__name__
