"""The one exception type for user errors (bad paths, impossible settings, mismatched models)."""


class STSError(Exception):
    """A user error: the CLI prints its message on one line and exits non-zero."""
