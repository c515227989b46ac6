"""The one exception type that reaches users: a problem with their input, and how to fix it."""


class ProxSparseError(Exception):
    """Bad input or environment. The message names the problem and the fix in one line."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
