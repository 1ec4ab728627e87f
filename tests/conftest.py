"""Pytest fixtures. The tiny models themselves, and the checks that a probe call left a model
unchanged, are in tiny_models.py (tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from probe.imports import import_leaving_state
from tiny_models import TinyNet

torch.set_num_threads(1)

# Importing Ultralytics replaces PIL's Image.open and torch.save and sets environment variables
# (probe.imports); the tests that build YOLO models import it, so import it first the way probe
# does: every test then runs in the process as it would be without it.
if importlib.util.find_spec("ultralytics") is not None:
    import_leaving_state("ultralytics.nn.tasks")
    import_leaving_state("ultralytics.utils.nms")


@pytest.fixture
def tiny_net() -> TinyNet:
    return TinyNet()
