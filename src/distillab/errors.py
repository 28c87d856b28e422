"""One exception type for bad input: the CLI prints its message on one line and exits non-zero."""


class UserError(ValueError):
    """Something the user gave us is wrong; the message says what and where, in one line."""
