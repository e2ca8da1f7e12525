"""One exception type for bad input: entry points print its single sentence and exit 2."""


class LokiError(ValueError):
    """A user-facing error whose message is one clear sentence saying what to change."""
