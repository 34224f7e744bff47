"""User-facing errors: one-line messages naming the file or option; the CLIs print them without a traceback."""


class UserError(Exception):
    """A mistake the user can fix (missing file, bad option, corrupt input)."""


class DataError(UserError):
    """A dataset file or folder is missing or malformed."""


class CheckpointError(UserError):
    """A checkpoint or weight file is missing, corrupt or of an unexpected layout."""


class ConfigError(UserError):
    """A configuration value or command-line option is invalid."""
