"""The one exception type for mistakes a user can fix: printed as one line, no traceback."""


class UserError(Exception):
    """Bad input: an unknown value, a missing file, an incompatible choice, a diverged run.

    The message names the bad value and what is accepted instead.
    """
