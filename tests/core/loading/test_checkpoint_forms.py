"""load_checkpoint on checkpoints as users have them, and one-line errors for files that are not.

Every accepted form is built here from one source model and must give bit-identical outputs;
every refused file must give the one-line message written out below.
"""

from __future__ import annotations

import argparse
import importlib
import pickle
import sys
import textwrap
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from probe.errors import ProbeError
from probe.loading.checkpoints import load_checkpoint
from probe.loading.models import CifarResNet, cifar_resnet

torch.set_num_threads(1)

# A ResNet-8 (one block per stage, option-A shortcuts) has 44 state_dict entries: the stem conv
# and BN (1 + 5: weight, bias, running_mean, running_var, num_batches_tracked), three blocks of
# two convs and two BNs (3 * 12) and the classifier (2).
RESNET8_TENSORS = 44
RESNET8_NORM_LAYERS = 7


def _source() -> CifarResNet:
    torch.manual_seed(0)
    model = cifar_resnet(8, num_classes=3)
    model.train()
    with torch.no_grad():  # BN statistics away from (0, 1), so outputs depend on the buffers too
        for _ in range(2):
            model(torch.randn(8, 3, 8, 8) * 3 + 1)
    return model.eval()


def _fresh() -> CifarResNet:
    torch.manual_seed(1)
    return cifar_resnet(8, num_classes=3).eval()


def _inputs() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))


def _assert_loads_identically(source: nn.Module, path: Path, **kwargs) -> nn.Module:
    target = _fresh()
    x = _inputs()
    with torch.no_grad():
        assert not torch.equal(target(x), source(x))  # the load below is what makes them agree
        assert load_checkpoint(target, path, **kwargs) is target
        assert torch.equal(target(x), source(x))
    return target


def _message(path: Path, model: nn.Module | None = None, **kwargs) -> str:
    with pytest.raises(ProbeError) as info:
        load_checkpoint(_fresh() if model is None else model, path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message  # one line, no colour codes
    return message


# --- accepted forms --------------------------------------------------------------------------


def test_plain_state_dict(tmp_path):
    source = _source()
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    _assert_loads_identically(source, tmp_path / "plain.pt")


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict", "net"])
def test_state_dict_under_a_key(tmp_path, key):
    source = _source()
    torch.save({"epoch": 164, key: source.state_dict(), "best_prec1": 93.39}, tmp_path / "c.pth")
    _assert_loads_identically(source, tmp_path / "c.pth")


def test_legacy_dataparallel_file_without_num_batches_tracked(tmp_path):
    # As an old torch (before 0.4.1, and the pre-1.6 file format) saved a DataParallel model:
    # "module." keys, no num_batches_tracked buffers, no per-module version metadata.
    source = _source()
    saved = nn.DataParallel(source).state_dict()
    legacy = {k: v for k, v in saved.items() if not k.endswith("num_batches_tracked")}
    assert len(legacy) == RESNET8_TENSORS - RESNET8_NORM_LAYERS
    assert all(k.startswith("module.") for k in legacy)
    torch.save({"epoch": 164, "state_dict": legacy, "best_prec1": 93.39}, tmp_path / "old.th",
               _use_new_zipfile_serialization=False)
    target = _assert_loads_identically(source, tmp_path / "old.th")
    # As torch does for such files, each BatchNorm keeps its own count (0 in a fresh model).
    counts = [m.num_batches_tracked.item() for m in target.modules()
              if isinstance(m, nn.BatchNorm2d)]
    assert counts == [0] * RESNET8_NORM_LAYERS
    torch_target = _fresh()
    torch_target.load_state_dict({k[len("module."):]: v for k, v in legacy.items()}, strict=True)


def test_missing_num_batches_tracked_with_version_2_metadata_is_refused_like_torch(tmp_path):
    # A file from a torch that saves num_batches_tracked but lacks one: torch refuses it too.
    state = _source().state_dict()
    del state["bn1.num_batches_tracked"]
    assert state._metadata["bn1"]["version"] == 2
    torch.save(state, tmp_path / "dropped.pt")
    with pytest.raises(RuntimeError, match="bn1.num_batches_tracked"):
        _fresh().load_state_dict(torch.load(tmp_path / "dropped.pt", weights_only=True))
    assert _message(tmp_path / "dropped.pt") == (
        f"checkpoint '{tmp_path / 'dropped.pt'}' (a state_dict of 43 tensors) does not fit "
        "CifarResNet (44 tensors): missing keys: bn1.num_batches_tracked."
    )


def test_other_missing_buffers_stay_errors(tmp_path):
    legacy = {k: v for k, v in _source().state_dict().items()
              if not k.endswith("num_batches_tracked") and k != "layer2.0.bn1.running_var"}
    torch.save(legacy, tmp_path / "partial.pt")
    model = _fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert _message(tmp_path / "partial.pt", model) == (
        f"checkpoint '{tmp_path / 'partial.pt'}' (a state_dict of 36 tensors) does not fit "
        "CifarResNet (44 tensors): missing keys: layer2.0.bn1.running_var."
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_torch_compile_prefix(tmp_path):
    source = _source()
    compiled = torch.compile(source).state_dict()
    assert next(iter(compiled)) == "_orig_mod.conv1.weight"
    torch.save(compiled, tmp_path / "compiled.pt")
    _assert_loads_identically(source, tmp_path / "compiled.pt")
    # DDP around a compiled model, as renamed keys.
    both = OrderedDict((f"module.{k}", v) for k, v in compiled.items())
    torch.save(both, tmp_path / "both.pt")
    _assert_loads_identically(source, tmp_path / "both.pt")


def test_wrapped_target_model(tmp_path):
    source = _source()
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    for wrap in (torch.compile, nn.DataParallel):
        target = _fresh()
        wrapped = wrap(target)
        assert load_checkpoint(wrapped, tmp_path / "plain.pt") is wrapped
        assert all(torch.equal(a, b) for a, b in
                   zip(target.state_dict().values(), source.state_dict().values()))


def test_whole_pickled_module_loads_without_unpickling_code(tmp_path):
    source = _source()
    torch.save(source, tmp_path / "whole.pt")
    with pytest.raises(pickle.UnpicklingError):  # what plain weights-only loading does
        torch.load(tmp_path / "whole.pt", weights_only=True)
    _assert_loads_identically(source, tmp_path / "whole.pt")
    torch.save({"model": source, "epoch": 3}, tmp_path / "in_dict.pt")
    _assert_loads_identically(source, tmp_path / "in_dict.pt")


def _user_module(tmp_path: Path, monkeypatch) -> object:
    (tmp_path / "ckpt_user_net.py").write_text(textwrap.dedent("""
        from torch import nn

        class UserNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(2, 2)

            def forward(self, x):
                return self.fc(x)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ckpt_user_net", raising=False)
    return importlib.import_module("ckpt_user_net")


def test_pickled_module_of_a_class_not_imported(tmp_path, monkeypatch):
    module = _user_module(tmp_path, monkeypatch)
    torch.manual_seed(0)
    source = module.UserNet()
    torch.save(source, tmp_path / "user.pt")
    monkeypatch.delitem(sys.modules, "ckpt_user_net")  # as in a fresh process
    target = module.UserNet()
    assert _message(tmp_path / "user.pt", target) == (
        f"cannot read checkpoint '{tmp_path / 'user.pt'}': it is a pickled torch.nn.Module "
        "(torch.save(model)); it names classes or functions this process has not imported "
        "(ckpt_user_net.UserNet); import the module that defines them first. Pass "
        "allow_pickle=True if you trust the file, or re-save it with "
        "torch.save(model.state_dict(), path)."
    )
    assert "ckpt_user_net" not in sys.modules  # refusing imported nothing
    load_checkpoint(target, tmp_path / "user.pt", allow_pickle=True)  # imports it from the path
    x = torch.randn(3, 2)
    assert torch.equal(target(x), source(x))


def test_other_pickled_objects_need_allow_pickle(tmp_path):
    source = _source()
    torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": source.state_dict()},
               tmp_path / "args.pt")
    assert _message(tmp_path / "args.pt") == (
        f"cannot read checkpoint '{tmp_path / 'args.pt'}': it is a torch checkpoint; it holds "
        "objects that loading without running the file's code refuses (argparse.Namespace). "
        "Pass allow_pickle=True if you trust the file, or re-save it with "
        "torch.save(model.state_dict(), path)."
    )
    _assert_loads_identically(source, tmp_path / "args.pt", allow_pickle=True)


@pytest.mark.parametrize("name", ["model.safetensors", "weights.pt"])
def test_safetensors(tmp_path, name):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    source = _source()
    safetensors_torch.save_file(source.state_dict(), tmp_path / name)
    _assert_loads_identically(source, tmp_path / name)


# --- refused files -----------------------------------------------------------------------------


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").touch()
    assert _message(tmp_path / "empty.pt") == (
        f"cannot read checkpoint '{tmp_path / 'empty.pt'}': it is an empty file (0 bytes)."
    )


def test_random_bytes(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, size=1000, dtype=np.uint8).tobytes()
    (tmp_path / "noise.pt").write_bytes(data)
    first = data[:8].hex(" ")
    assert _message(tmp_path / "noise.pt") == (
        f"cannot read checkpoint '{tmp_path / 'noise.pt'}': it is not a torch checkpoint: 1000 "
        f"bytes that are no zip archive, pickle or safetensors file (they begin {first})."
    )


def test_directory(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("x")
    (tmp_path / "run" / "a.pt").write_bytes(b"")
    assert _message(tmp_path / "run") == (
        f"checkpoint '{tmp_path / 'run'}' is a directory (holding a.pt, notes.txt), not a file; "
        "pass the checkpoint file itself."
    )
    (tmp_path / "none").mkdir()
    assert "is a directory (empty)" in _message(tmp_path / "none")


def test_state_dict_of_another_depth(tmp_path):
    torch.save(cifar_resnet(14, num_classes=3).state_dict(), tmp_path / "r14.pt")
    # ResNet-14 has two blocks per stage: 6 + 6 * 12 + 2 = 80 tensors, 36 more than ResNet-8.
    assert _message(tmp_path / "r14.pt") == (
        f"checkpoint '{tmp_path / 'r14.pt'}' (a state_dict of 80 tensors) does not fit "
        "CifarResNet (44 tensors): unexpected keys: layer1.1.conv1.weight, layer1.1.bn1.weight, "
        "layer1.1.bn1.bias, layer1.1.bn1.running_mean, layer1.1.bn1.running_var, ... "
        "(36 in all)."
    )


def test_state_dict_of_another_class_count(tmp_path):
    torch.save({"state_dict": cifar_resnet(8, num_classes=10).state_dict()}, tmp_path / "c10.pt")
    assert _message(tmp_path / "c10.pt") == (
        f"checkpoint '{tmp_path / 'c10.pt'}' (a state_dict of 44 tensors under 'state_dict') "
        "does not fit CifarResNet (44 tensors): shape mismatches: fc.weight (checkpoint "
        "(10, 64), model (3, 64)), fc.bias (checkpoint (10,), model (3,))."
    )


def test_keys_under_an_unknown_prefix_are_pointed_out(tmp_path):
    state = {f"model.{k}": v for k, v in _source().state_dict().items()}  # Lightning-style
    torch.save(state, tmp_path / "lightning.pt")
    message = _message(tmp_path / "lightning.pt")
    assert message.endswith(
        "(44 in all); every checkpoint key starts with 'model.', no model key does."
    )
    assert "missing keys: conv1.weight, bn1.weight," in message


def _optimizer_state() -> dict:
    model = _fresh()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(_inputs()).sum().backward()
    optimizer.step()
    return optimizer.state_dict()


_EXPECTED = ("probe reads a state_dict, a dict holding one under 'state_dict', 'model', "
             "'model_state_dict' or 'net', or a pickled nn.Module.")


def test_optimizer_only(tmp_path):
    torch.save(_optimizer_state(), tmp_path / "opt.pt")
    assert _message(tmp_path / "opt.pt") == (
        f"checkpoint '{tmp_path / 'opt.pt'}' holds no model weights: it is an optimizer's "
        f"state_dict (keys 'state' and 'param_groups'); {_EXPECTED}"
    )
    torch.save({"epoch": 3, "optimizer": _optimizer_state(), "best_acc": 0.9},
               tmp_path / "resume.pt")
    assert _message(tmp_path / "resume.pt") == (
        f"checkpoint '{tmp_path / 'resume.pt'}' holds no model weights: it is a dict with keys "
        f"['epoch', 'optimizer', 'best_acc'], 'optimizer' holding an optimizer's state; "
        f"{_EXPECTED}"
    )


def test_text_files(tmp_path):
    (tmp_path / "lfs.pt").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:4bfd9763\nsize 3438432\n"
    )
    assert _message(tmp_path / "lfs.pt") == (
        f"cannot read checkpoint '{tmp_path / 'lfs.pt'}': it is a Git LFS pointer, not the "
        "weights; fetch them with `git lfs pull`."
    )
    (tmp_path / "page.pt").write_text("<!DOCTYPE html>\n<html><body>Not found</body></html>")
    assert _message(tmp_path / "page.pt") == (
        f"cannot read checkpoint '{tmp_path / 'page.pt'}': it is a text file beginning "
        "'<!DOCTYPE html>', not a torch checkpoint."
    )


def test_truncated_and_foreign_zip_files(tmp_path):
    torch.save(_source().state_dict(), tmp_path / "full.pt")
    whole = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    assert _message(tmp_path / "cut.pt") == (
        f"cannot read checkpoint '{tmp_path / 'cut.pt'}': it is a truncated or damaged zip "
        f"archive ({len(whole) // 2} bytes)."
    )
    np.savez(tmp_path / "arrays.npz", weights=np.zeros(3))
    assert _message(tmp_path / "arrays.npz") == (
        f"cannot read checkpoint '{tmp_path / 'arrays.npz'}': it is a zip archive of "
        "weights.npy, not a torch checkpoint."
    )


def test_torchscript_archive(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in new torch
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "scripted.pt")
    assert _message(tmp_path / "scripted.pt") == (
        f"cannot read checkpoint '{tmp_path / 'scripted.pt'}': it is a TorchScript archive "
        "(torch.jit.save), not a state_dict; load it with torch.jit.load and save its "
        "state_dict()."
    )
