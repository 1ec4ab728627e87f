"""Run by tests/core/test_distributed.py under torchrun: measure and sweep on this rank's shard."""

import json
import sys

import torch

import probe
from probe import distributed
from probe.loading.models import cifar_resnet


def dataset():
    generator = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.randn(21, 1, 16, 16, generator=generator),
                                          torch.randint(0, 4, (21,), generator=generator))


def results(data):
    torch.manual_seed(0)
    model = cifar_resnet(20, num_classes=4, in_channels=1).eval()
    stats = probe.measure(model, data, per_class=True, progress=False)
    baseline, ablations = probe.evaluate_ablations(model, data, [["layer1.0"], ["layer2.0", "layer3.2"]],
                                                   per_class=True, outcomes=True, progress=False)
    means = probe.branch_means(model, data, progress=False)
    return {
        "stats": stats.to_dict(orient="list"),
        "baseline": {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in baseline.items()},
        "ablations": [{k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in a.items()} for a in ablations],
        "mean_norm": float(sum(m.double().norm() for m in means.values())),
    }


def main() -> None:
    distributed.init_from_environment(torch.device("cpu"))
    torch.set_num_threads(1)
    loader = torch.utils.data.DataLoader(distributed.shard(dataset()), batch_size=4)
    output = results(loader)
    if distributed.rank() == 0:
        with open(sys.argv[1], "w") as handle:
            json.dump({"world_size": distributed.world_size(), **output}, handle)
    distributed.barrier()


if __name__ == "__main__":
    main()
