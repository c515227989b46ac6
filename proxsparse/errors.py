"""The one exception type that reaches users: a problem with their input, and how to fix it;
and the one check of numeric options, which names the flag."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


class ProxSparseError(Exception):
    """Bad input or environment. The message names the problem and the fix in one line."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@dataclass(frozen=True)
class Rule:
    """What a numeric option must be: ``text`` says it, ``test`` checks a finite number."""

    text: str
    test: Callable[[float], bool]
    integer: bool = False


COUNT = Rule("a positive integer", lambda v: v >= 1, integer=True)
STEPS = Rule("an integer ≥ 0", lambda v: v >= 0, integer=True)
WINDOW = Rule("an integer ≥ 2 (a window predicts its tokens after the first)",
              lambda v: v >= 2, integer=True)
SEED = Rule("an integer in [-2**63, 2**64)", lambda v: -(2**63) <= v < 2**64, integer=True)
NON_NEGATIVE = Rule("a finite number ≥ 0", lambda v: v >= 0)
POSITIVE = Rule("a finite number > 0", lambda v: v > 0)
SHARE = Rule("a number from 0 to 1", lambda v: 0 <= v <= 1)


def check_options(owner: object, **rules: Rule | tuple[str, ...]) -> None:
    """Each named attribute of ``owner`` (a config, or parsed arguments) must satisfy its
    rule, or be one of its choices (a tuple); the error names the flag."""
    for name, rule in rules.items():
        value = getattr(owner, name)
        if isinstance(rule, tuple):
            valid, text = value in rule, " or ".join(repr(choice) for choice in rule)
        else:
            kinds = int if rule.integer else (int, float)
            valid = (isinstance(value, kinds) and not isinstance(value, bool)
                     and math.isfinite(value) and rule.test(value))
            text = rule.text
        if not valid:
            raise ProxSparseError(f"--{name.replace('_', '-')} must be {text}, got {value!r}")
