"""`package.module:attribute` names, as users give their own models, data sets and tasks; and
importing a library that changes global state on import without letting it."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from types import ModuleType

import numpy as np
import torch
from PIL import Image

from probe.errors import ProbeError

__all__ = ["import_attribute", "import_leaving_state"]


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


def import_leaving_state(name: str) -> ModuleType:
    """`importlib.import_module(name)`, with the process-wide settings that importing Ultralytics
    changes put back: it replaces `PIL.Image.open` (with one that tries to pip-install a HEIF
    plugin for an unreadable image) and `torch.save`, sets torch's and NumPy's print options and
    OpenCV's threads, and writes environment variables (OMP_NUM_THREADS among them). probe leaves
    the process as it found it; a library's own functions, called later, are its business."""
    if sys.modules.get(name) is not None:
        return sys.modules[name]
    with _process_settings_kept():
        return importlib.import_module(name)


@contextlib.contextmanager
def _process_settings_kept() -> Iterator[None]:
    environment = dict(os.environ)
    image_open, torch_save = Image.open, torch.save
    torch_print = torch._tensor_str.PRINT_OPTS.__dict__.copy()
    numpy_print = np.get_printoptions()
    cv2 = sys.modules.get("cv2")  # imported by the library itself when absent: then nothing to restore to
    cv2_threads = cv2.getNumThreads() if cv2 is not None else None
    try:
        yield
    finally:
        Image.open, torch.save = image_open, torch_save
        torch._tensor_str.PRINT_OPTS.__dict__.update(torch_print)
        np.set_printoptions(**numpy_print)
        if cv2_threads is not None:
            cv2.setNumThreads(cv2_threads)
        for key in set(os.environ) - set(environment):
            del os.environ[key]
        os.environ.update(environment)
