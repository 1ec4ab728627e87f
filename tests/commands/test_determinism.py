"""Same seed and inputs give identical tables."""

import pandas as pd
import torch

import probe
from probe.loading.models import cifar_resnet


def run_once():
    torch.manual_seed(0)
    model = cifar_resnet(20, num_classes=4, in_channels=1).eval()
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 1, 16, 16, generator=generator), torch.randint(0, 4, (8,), generator=generator))
            for _ in range(2)]
    stats = probe.measure(model, data, per_class=True, progress=False)
    result = probe.sweep(model, data, mode="mean", progress=False)
    return stats, result


def test_two_runs_give_identical_tables():
    first, second = run_once(), run_once()
    for a, b in zip(first, second):
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert first[1].attrs["baseline"] == second[1].attrs["baseline"]
