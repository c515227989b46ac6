"""The one exception type that reaches users: a problem with their input, and how to fix it."""


class ProxSparseError(Exception):
    """Bad input or environment. The message names the problem and the fix in one line."""
