"""`package.module:attribute` names, as users give their own models, data sets and tasks."""

from __future__ import annotations

import importlib

from probe.errors import ProbeError

__all__ = ["import_attribute"]


def import_attribute(spec: str, what: str) -> object:
    """The object `spec` ("package.module:name", dots allowed after the colon) names; a
    ProbeError naming `what` ("model", "task", "dataset") when it cannot be found."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ProbeError(f"{what} {spec!r}: expected 'package.module:name'.")
    try:
        found: object = importlib.import_module(module_name)
    except ImportError as error:
        raise ProbeError(f"{what} {spec!r}: cannot import module {module_name!r} ({error}); is it on "
                         "PYTHONPATH?") from error
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ProbeError(f"{what} {spec!r}: module {module_name!r} has no {attribute!r}.")
        found = getattr(found, part)
    return found
