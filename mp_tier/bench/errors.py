"""The one error the bench reports without a traceback."""


class UsageError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""
