"""Pytest fixtures. The tiny models themselves, and the checks that a probe call left a model
unchanged, are in tiny_models.py (tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import pytest
import torch

from tiny_models import TinyNet

torch.set_num_threads(1)


@pytest.fixture
def tiny_net() -> TinyNet:
    return TinyNet()
