"""The one exception type users see for mistakes they can fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ProbeError(ValueError):
    """A user-caused error: the message names the bad value and what would work.

    The CLI prints it as one line on stderr and exits non-zero, without a traceback.
    """


def close_matches(value: str, options: Iterable[str], n: int = 3) -> str:
    """A ' Did you mean ...?' hint naming the options closest to `value`, or ''."""
    matches = difflib.get_close_matches(str(value), list(options), n=n, cutoff=0.5)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(m) for m in matches) + "?"


def unknown_name(kind: str, value: str, options: Iterable[str]) -> ProbeError:
    """ProbeError for an unknown name: says what exists and what is closest."""
    options = sorted(options)
    shown = ", ".join(options[:12]) + (", ..." if len(options) > 12 else "")
    return ProbeError(f"unknown {kind} {value!r}.{close_matches(value, options)} Known: {shown}.")
