"""Tests for probe.train and probe.loading.cache: tiny models and data, exact numbers."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import probe.loading.cache
import probe.loading.checkpoints
from probe.loading.cache import cache_dir, cached_model
from probe.loading.datasets import make_loader
from probe.errors import ProbeError
from probe.loading.checkpoints import load_checkpoint
from probe.loading.models import build_model
from probe.commands.config import RunConfig
from probe.train import _parser, _train_config, main
from probe.loading.training import HISTORY_COLUMNS, TrainConfig, evaluate, train

# A few hundred samples' worth of CIFAR-style training: enough to exercise every path, fast.
TINY = dict(model="resnet20", epochs=1, batch_size=16, limit=32)


def _separable(n: int = 40) -> TensorDataset:
    """Two classes on either side of x0 = 0, well apart: (n, 2) points, labels 0/1."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    x = torch.randn(n, 2, generator=g) * 0.3
    x[:, 0] += torch.where(labels == 1, 2.0, -2.0)
    return TensorDataset(x, labels)


def test_learns_separable_task():
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    data = _separable()
    history = train(
        model, make_loader(data, batch_size=8, shuffle=True), epochs=5, lr=0.5,
        momentum=0.9, weight_decay=0.0, progress=False, test_loader=make_loader(data),
    )
    assert list(history.columns) == list(HISTORY_COLUMNS)
    assert history.epoch.tolist() == [1, 2, 3, 4, 5]
    assert history.test_accuracy.iloc[-1] == 1.0
    assert history.train_loss.iloc[-1] < history.train_loss.iloc[0]
    assert history[["train_accuracy", "test_accuracy"]].stack().between(0, 1).all()
    assert not model.training


def test_history_without_test_loader_has_nan():
    history = train(nn.Linear(2, 2), DataLoader(_separable(8), batch_size=4), epochs=1, lr=0.1,
                    progress=False)
    assert math.isnan(history.test_loss.iloc[0]) and math.isnan(history.test_accuracy.iloc[0])


def _small_convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )


def _train_once(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    data = TensorDataset(torch.randn(24, 1, 6, 6, generator=g), torch.arange(24) % 3)
    torch.manual_seed(seed)
    model = _small_convnet()
    train(model, make_loader(data, batch_size=5, shuffle=True, seed=seed), epochs=2, lr=0.1,
          momentum=0.9, weight_decay=5e-4, progress=False)
    return model.state_dict()


def test_same_seed_gives_bit_identical_parameters():
    a, b, c = _train_once(0), _train_once(0), _train_once(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_evaluate_by_hand():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        model.bias.zero_()
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]])
    y = torch.tensor([0, 1, 0])
    # logits = x; per-sample CE = logsumexp(x) - x[y]:
    #   log(e^2 + 1) - 2,  log(1 + e) - 1,  log(e + e^3) - 1
    expected_loss = (
        math.log(math.exp(2) + 1) - 2 + math.log(1 + math.e) - 1 + math.log(math.e + math.e**3) - 1
    ) / 3
    model.train()
    loss, acc = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=2))
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert acc == pytest.approx(2 / 3)
    assert model.training  # flag restored


def test_evaluate_empty_loader():
    with pytest.raises(ProbeError, match="empty"):
        evaluate(nn.Linear(2, 2), [])


def test_config_validation():
    with pytest.raises(ProbeError, match="epochs"):
        TrainConfig(epochs=0)


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "probe"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "probe"


def test_cached_model_trains_once_then_loads(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    real_train_model = probe.loading.cache.train_model

    def counting_train_model(config, **kwargs):
        calls.append(config)
        return real_train_model(config, **kwargs)

    monkeypatch.setattr(probe.loading.cache, "train_model", counting_train_model)
    config = TrainConfig(**TINY)
    first, path = cached_model(config, progress=False)
    assert "trained" in capsys.readouterr().err
    assert path.parent == tmp_path / "probe" / "models" and path.name.startswith("resnet20-digits-")
    mtime = path.stat().st_mtime_ns
    second, path2 = cached_model(config, progress=False)
    assert "loaded" in capsys.readouterr().err
    assert path2 == path and path.stat().st_mtime_ns == mtime
    assert len(calls) == 1
    assert not second.training
    a, b = first.state_dict(), second.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Another seed is another cache entry.
    assert probe.loading.cache.checkpoint_path(TrainConfig(**TINY, seed=1)) != path


def test_cli_writes_checkpoint(tmp_path, capsys):
    out = tmp_path / "ck.pt"
    argv = ["--model", "resnet20", "--epochs", "1", "--train-batch-size", "16", "--limit", "32",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and str(out) in printed
    model = build_model("resnet20", num_classes=10, in_channels=1)
    load_checkpoint(model, out)  # loads without a mismatch
    meta = torch.load(out, weights_only=True)["metadata"]
    assert meta["config"]["model"] == "resnet20" and meta["config"]["limit"] == 32
    assert len(meta["history"]["test_accuracy"]) == 1


def test_cli_user_error_is_one_line(capsys):
    assert main(["--model", "resnet57", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("probe.train: error: unknown model 'resnet57'")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_options_are_the_run_configs_and_train_the_cached_default(monkeypatch, tmp_path):
    # One option set: every option of probe.train is a RunConfig field, with RunConfig's default ...
    args = _parser().parse_args([])
    defaults = RunConfig()
    for name, value in vars(args).items():
        if name not in ("out", "no_progress"):
            assert value == getattr(defaults, name), name
    # ... and the training defaults are the trainer's, so the default model is the one the cache holds.
    config = _train_config(RunConfig.from_args(args, device="cpu"))
    assert config == TrainConfig()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert probe.loading.cache.checkpoint_path(config).name == "resnet56-digits-d311df5d181e.pt"


def test_cli_training_options_are_validated_once(capsys):
    assert main(["--lr", "0", "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("probe.train: error: --lr must be positive")
    with pytest.raises(ProbeError, match="--train-batch-size"):
        RunConfig(train_batch_size=0)


def test_checkpoints_are_written_whole_and_readable(tmp_path):
    # Through probe.files' atomic writer: no temp file left, and the permissions of any new file.
    path = probe.loading.checkpoints.save_checkpoint(nn.Linear(2, 2), tmp_path / "c.pt", note="x")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert torch.load(path, weights_only=True)["metadata"] == {"note": "x"}
