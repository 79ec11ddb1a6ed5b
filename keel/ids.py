"""The one rule for identifiers: containerd's.

Container, exec and sandbox ids reach Keel from containerd (which checks
them with this rule, ``identifiers.Validate``), from CRI annotations, from
opsctl and from directory names under the state root.  They become path
components, process titles and log fields, so each is checked once where
it enters, with the same rule everywhere: letters and digits, separated
by single ``.``, ``_`` or ``-``, at most 76 characters.
"""

from __future__ import annotations

import re

from keel.errors import InvalidArgument

#: containerd's ``identifiers.Validate`` pattern and length.
PATTERN = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")
MAX_LEN = 76


def valid(value: object) -> bool:
    """True if *value* is a string that follows the rule."""
    return (isinstance(value, str) and 0 < len(value) <= MAX_LEN
            and PATTERN.fullmatch(value) is not None)


def check(value: object, what: str = "id", *, optional: bool = False) -> str:
    """*value* if it follows the rule (or is empty and *optional*).

    Raises InvalidArgument naming *what* and the rule.
    """
    if optional and value == "":
        return ""
    if not valid(value):
        raise InvalidArgument(
            f"invalid {what} {value!r}: letters and digits separated by single '.', '_' or"
            f" '-', at most {MAX_LEN} characters")
    assert isinstance(value, str)
    return value
