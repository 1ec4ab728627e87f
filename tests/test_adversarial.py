"""Adversarial use: Ctrl-C at any point, threads, odd inputs, damaged run folders.

Each test's docstring names the promise it checks: "ProbeError naming the value"; "model,
flags, hooks and global torch state exactly as before"; or "no stale or mixed numbers" (the CLI's
"one-line error with exit 2": tests/commands/test_cli_promises.py).
"""

import copy
import glob
import math
import os
import sys
import threading

import pandas as pd
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_machinery
from torch.overrides import _get_current_function_mode_stack

import probe
from probe.commands.run_folder import RunDirectory
from tiny_models import TinyBlock, TinyNet, assert_unchanged, snapshot

PROBE_FILES = set(glob.glob(os.path.join(os.path.dirname(probe.__file__), "**", "*.py"), recursive=True))
# torch.fx's code that patches nn.Module for a trace, and undoes it (not the patching of globals,
# checked thousands of times per trace).
FX_PATCHING = {"trace", "_new_patcher", "patch_method", "revert", "revert_all_patches", "_set_is_fx_tracing"}


def in_probe(code) -> bool:
    return code.co_filename in PROBE_FILES


def in_tracing(code) -> bool:
    """fx's patching, and probe's code around its traces (all of probe's code has a test of its own)."""
    if code.co_filename == torch.fx._symbolic_trace.__file__:
        return code.co_name in FX_PATCHING
    return in_probe(code) and os.path.basename(code.co_filename) in ("hooks.py", "recording.py")


# -- what "exactly as before" means beyond the model ----------------------------------------

_GLOBAL_HOOKS = [name for name in dir(module_machinery) if name.startswith("_global_") and name.endswith("hooks")]


def global_state() -> dict:
    """Process- and thread-wide torch state a probe call might leave changed."""
    return {
        "module_call": nn.Module.__dict__["__call__"],
        "module_getattr": nn.Module.__dict__["__getattr__"],
        "function_modes": list(_get_current_function_mode_stack()),
        "grad_enabled": torch.is_grad_enabled(),
        "fx_tracing": getattr(torch.fx._symbolic_trace, "_get_is_fx_tracing", torch.fx._symbolic_trace.is_fx_tracing)(),
        "global_hooks": {name: len(getattr(module_machinery, name)) for name in _GLOBAL_HOOKS},
    }


def assert_all_as_before(model: nn.Module, before: dict, world: dict) -> None:
    assert_unchanged(model, before)
    assert global_state() == world


# -- models whose forwards can be interrupted at the k-th module call --------------------------


class Trip:
    """Raises KeyboardInterrupt at its k-th tick: a Ctrl-C landing at that point of a forward."""

    def __init__(self) -> None:
        self.at: int | None = None
        self.ticks = 0

    def arm(self, at: int | None) -> None:
        self.at, self.ticks = at, 0

    def tick(self) -> None:
        self.ticks += 1
        if self.ticks == self.at:
            raise KeyboardInterrupt(f"tick {self.ticks}")


class HookedBlock(nn.Module):
    """relu(x + bn(fc(drop(x)))): a branch that ends in a module (strategy "hooks")."""

    def __init__(self, trip: Trip) -> None:
        super().__init__()
        self.trip = trip
        self.drop = nn.Dropout(0.5)
        self.branch = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.trip.tick()
        return torch.relu(x + self.branch(self.drop(x)))


class ScaledBlock(nn.Module):
    """x + gamma * f(x): a branch that ends in a learned scale (strategy "intercept")."""

    def __init__(self, trip: Trip) -> None:
        super().__init__()
        self.trip = trip
        self.f = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.gamma = nn.Parameter(torch.full((4,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.trip.tick()
        return x + self.gamma * self.f(x)


class TripNet(nn.Module):
    """stem, two residual blocks, head; `untraceable` adds control flow fx cannot trace."""

    def __init__(self, block: type, trip: Trip, untraceable: bool = False) -> None:
        super().__init__()
        self.trip, self.untraceable = trip, untraceable
        self.stem = nn.Linear(4, 4)
        self.blocks = nn.Sequential(block(trip), block(trip))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.trip.tick()
        if self.untraceable and bool(x.sum() > -1e30):  # data-dependent: fx cannot trace it
            x = x * 1.0
        return self.head(self.blocks(self.stem(x)))


def trip_net(block: type = HookedBlock, *, train: bool = True, untraceable: bool = False) -> TripNet:
    torch.manual_seed(0)
    model = TripNet(block, Trip(), untraceable)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    model.train(train)
    if train:
        model.blocks[1].eval()  # mixed flags must come back as they were
    return model


def trip_data() -> list:
    torch.manual_seed(1)
    return [(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])) for _ in range(2)]


def _ablated_forward(model: nn.Module, data: list) -> torch.Tensor:
    with probe.ablated(model, ["blocks.0"]), torch.no_grad():
        return model(data[0][0])


CALLS = {
    "measure": lambda m, d: probe.measure(m, d, progress=False),
    "measure_per_class": lambda m, d: probe.measure(m, d, per_class=True, progress=False),
    "branch_means": lambda m, d: probe.branch_means(m, d, progress=False),
    "sweep": lambda m, d: probe.sweep(m, d, progress=False),
    "sweep_mean": lambda m, d: probe.sweep(m, d, mode="mean", progress=False),
    "sweep_full": lambda m, d: probe.sweep(m, d, fast=False, progress=False),
    "ablated": _ablated_forward,
    "find_blocks": lambda m, d: probe.find_blocks(m),
    "find_blocks_recorded": lambda m, d: probe.find_blocks(m, example_input=d[0][0]),
    "describe_blocks": lambda m, d: probe.describe_blocks(m, d[0][0]),
}


def _interrupted(call, model: nn.Module, data: list, trip: Trip, at: int) -> bool:
    """Run the call with a Ctrl-C at the trip's `at`-th tick; False when it finished first."""
    trip.arm(at)
    try:
        CALLS[call](model, data)
    except KeyboardInterrupt:
        return True
    finally:
        trip.arm(None)
    return False


@pytest.mark.parametrize("block", [HookedBlock, ScaledBlock])
@pytest.mark.parametrize("where", ["forward", "hook"])
@pytest.mark.parametrize("call", CALLS)
def test_ctrl_c_at_every_module_call_leaves_no_trace(call, where, block):
    """model, flags, hooks and global torch state exactly as before (and no stale numbers after)."""
    data = trip_data()
    train = call != "ablated"  # ablated's body is the user's forward: in train mode it moves BN statistics
    reference = probe.measure(trip_net(block, train=train), data, progress=False)
    for at in range(1, 200):
        model = trip_net(block, train=train, untraceable=call == "find_blocks_recorded")
        trip = model.trip
        if where == "hook":  # the Ctrl-C lands in a user's forward hook instead
            trip = Trip()
            for module in model.modules():
                module.register_forward_hook(lambda _m, _a, _o: trip.tick())
        before, world = snapshot(model), global_state()
        if not _interrupted(call, model, data, trip, at):
            break  # every phase of the call has been interrupted once
        assert_all_as_before(model, before, world)
        if call != "find_blocks_recorded":  # (that model is measured from blocks found by a forward)
            pd.testing.assert_frame_equal(probe.measure(model, data, progress=False), reference)
    else:
        pytest.fail("the call never finished")
    assert at > 2


# -- Ctrl-C at any line: of probe's own code, and of torch.fx while it traces -----------------


def _interrupt_at_line(k: int, lines, call) -> str | None:
    """Run `call()` with a KeyboardInterrupt raised at the k-th line executed of the code that
    `lines(code)` selects, as a Ctrl-C landing there would; returns where it was raised, or None
    when the call finished first."""
    count = 0
    where = None

    def local(frame, event, _arg):
        nonlocal count, where
        if event == "line":
            count += 1
            if count == k:
                where = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
                raise KeyboardInterrupt(where)  # a tracer that raises is also switched off
        return local

    sys.settrace(lambda frame, _event, _arg: local if lines(frame.f_code) else None)
    try:
        call()
    except KeyboardInterrupt:
        return where
    finally:
        sys.settrace(None)
    return None


def _lines_executed(lines, call) -> int:
    count = 0

    def local(_frame, event, _arg):
        nonlocal count
        count += event == "line"
        return local

    sys.settrace(lambda frame, _event, _arg: local if lines(frame.f_code) else None)
    try:
        call()
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize("block", [HookedBlock, ScaledBlock])
# slow: the sweep, Ctrl-C at each of its lines in turn (quadratic in the lines it runs)
@pytest.mark.parametrize("call", ["branch_means", "measure", pytest.param("sweep", marks=pytest.mark.slow), "ablated"])
def test_ctrl_c_at_any_line_of_probe_leaves_no_trace(call, block):
    """model, flags, hooks and global torch state exactly as before: Ctrl-C can land anywhere,
    also in the code that restores the model (a second Ctrl-C while the first unwinds)."""
    data = trip_data()
    model = trip_net(block, train=call != "ablated")
    blocks = probe.find_blocks(model)  # once: discovery is cached per model
    reference = probe.measure(model, data, progress=False)
    run = {"branch_means": lambda: probe.branch_means(model, data, progress=False),
           "measure": lambda: probe.measure(model, data, progress=False),
           "sweep": lambda: probe.sweep(model, data, mode="mean", blocks=blocks, progress=False),
           "ablated": lambda: _ablated_forward(model, data)}[call]
    run()  # the fast sweep's traces are built once per model: interrupt the calls that reuse them
    _interrupt_at_every_line(model, run)
    pd.testing.assert_frame_equal(probe.measure(model, data, progress=False), reference)


def _interrupt_at_every_line(model: nn.Module, run, also_unchanged=lambda: None) -> None:
    """Interrupt `run()` at each line of probe's code it executes, in turn; after each, the
    model and torch's global state must be as before (and `also_unchanged()` hold)."""
    total = _lines_executed(in_probe, run)
    before, world = snapshot(model), global_state()
    for k in range(1, total + 1):
        where = _interrupt_at_line(k, in_probe, run)
        assert where is not None, k
        try:
            assert_all_as_before(model, before, world)
            also_unchanged()
        except AssertionError as error:
            raise AssertionError(f"Ctrl-C at {where} (line event {k} of {total})") from error


@pytest.mark.slow  # Ctrl-C at each line of torch.fx's trace in turn: quadratic in the lines it runs
@pytest.mark.parametrize("call", ["find_blocks", "sweep"])
def test_ctrl_c_at_any_line_of_an_fx_trace_unpatches_torch(call):
    """model, flags, hooks and global torch state exactly as before: torch.fx patches
    nn.Module.__call__ while it traces; a Ctrl-C while it undoes that must not leave it patched,
    nor be turned into another error (or into a sweep without its fast path)."""
    data = trip_data()
    blocks = probe.find_blocks(trip_net())
    runs = {"find_blocks": lambda model: probe.find_blocks(model),
            "sweep": lambda model: probe.sweep(model, data, blocks=blocks, progress=False)}
    world = global_state()
    total = _lines_executed(in_tracing, lambda: runs[call](trip_net()))
    for k in range(1, total + 1):
        model = trip_net()  # fresh: traces are cached per model
        before = snapshot(model)
        where = _interrupt_at_line(k, in_tracing, lambda: runs[call](model))
        assert where is not None, f"the Ctrl-C at line event {k} of {total} never reached the caller"
        try:
            assert_all_as_before(model, before, world)
            nn.Linear(2, 2)(torch.ones(1, 2))  # any model's forward still works
        except (AssertionError, NameError) as error:
            raise AssertionError(f"Ctrl-C at {where} (line event {k} of {total})") from error


# -- train-mode models, threads --------------------------------------------------------------


class DropoutBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(F.dropout(x, 0.5, self.training))


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(DropoutBlock(), DropoutBlock())
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.dropout(self.blocks(x), 0.5, self.training))


def test_fast_sweep_of_a_train_mode_model_runs_in_eval_mode():
    """no stale or mixed numbers: `sweep` evaluates in eval mode, and the fx suffixes it caches
    must not bake in the training-mode dropout of the model they were traced from."""
    torch.manual_seed(0)
    model = DropoutNet().train()
    data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    expected = probe.sweep(copy.deepcopy(model).eval(), data, fast=False, progress=False)
    for _ in range(2):
        pd.testing.assert_frame_equal(probe.sweep(model, data, progress=False), expected)
    model.eval()  # the suffixes cached while it trained must serve it now
    table = probe.sweep(model, data, progress=False)
    pd.testing.assert_frame_equal(table, expected)
    assert table.attrs["baseline"] == expected.attrs["baseline"]


class _Gate:
    """Holds the first caller's forward until the second caller has tried its own call."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, _module, _args) -> None:
        if threading.current_thread().name == "first":
            self.entered.set()
            self.release.wait(timeout=20)


@pytest.mark.parametrize("call", ["sweep", "measure", "branch_means"])
def test_a_second_thread_on_the_same_model_is_refused(call):
    """no stale or mixed numbers: two calls on one model would see each other's hooks, so the
    second one gets a ProbeError naming the model, and the first one's numbers are right."""
    model = trip_net(ScaledBlock, train=False)
    data = trip_data()
    expected = CALLS[call](model, data)
    gate = _Gate()
    model.head.register_forward_pre_hook(gate)
    outcome = {}

    def first() -> None:
        try:
            outcome["value"] = CALLS[call](model, data)
        except BaseException as error:  # reported below, in the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=first, name="first")
    thread.start()
    try:
        assert gate.entered.wait(timeout=20)
        with pytest.raises(probe.ProbeError, match="TripNet.*another thread"):
            CALLS[call](model, data)
    finally:
        gate.release.set()
        thread.join(timeout=20)
    assert "error" not in outcome, outcome.get("error")
    if call == "branch_means":
        assert all(torch.equal(outcome["value"][k], expected[k]) for k in expected)
    else:
        pd.testing.assert_frame_equal(outcome["value"], expected)
    CALLS[call](model, data)  # released: the next call runs


# -- blocks named twice, modules called twice, specs that say nothing -------------------------


@pytest.mark.parametrize("call", ["measure", "sweep", "branch_means"])
def test_a_block_named_twice_is_refused(tiny_net, call):
    """ProbeError naming the value: a repeated block name would give a row of NaN beside a real one."""
    data = [(torch.tensor([[1.0, 1.0]]), torch.tensor([0]))]
    run = {"measure": probe.measure, "sweep": probe.sweep, "branch_means": probe.branch_means}[call]
    with pytest.raises(probe.ProbeError, match="'block1' more than once"):
        run(tiny_net, data, blocks=["block1", "block2", "block1"], progress=False)


class TiedNet(nn.Module):
    """One block module run twice per forward (weights tied)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = TinyBlock([[1.0, 0.0], [0.0, 0.0]])  # F(x) = (x0, 0)
        self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            x = self.block(x)
        return self.head(x)


@pytest.mark.parametrize("spec", [None, "block=branch"])
def test_a_block_module_called_twice_counts_every_call(spec):
    """no stale or mixed numbers: each call of a tied block is one (F(x), s(x)) pair, so both
    count; the mean branch is over both calls."""
    model = TiedNet()
    blocks = probe.find_blocks(model, spec=spec)
    data = [(torch.tensor([[1.0, 1.0]]), torch.tensor([0]))]
    # Call 1: x = (1, 1), F = (1, 0); call 2: x = relu(x + F) = (2, 1), F = (2, 0).
    row = probe.measure(model, data, blocks=blocks, progress=False).iloc[0]
    assert row["samples"] == 2
    assert row["ratio"] == pytest.approx((1 / math.sqrt(2) + 2 / math.sqrt(5)) / 2)
    assert row["branch_norm"] == pytest.approx(1.5)
    per_class = probe.measure(model, data, blocks=blocks, per_class=True, progress=False)
    assert list(per_class["samples"]) == [2]
    assert torch.allclose(probe.branch_means(model, data, blocks=blocks, progress=False)["block"],
                          torch.tensor([1.5, 0.0]))


def test_a_spec_whose_branch_is_its_shortcut_is_refused(tiny_net):
    """ProbeError naming the value: F(x) measured against itself would read ratio 1, cosine 1."""
    with pytest.raises(probe.ProbeError, match="'block1.branch'.*both"):
        probe.find_blocks(tiny_net, spec="block1=branch,branch")
    same = probe.Block(name="b", module="block1", branch="block1.branch", shortcut="block1.branch", position=0)
    with pytest.raises(probe.ProbeError, match="'block1.branch'.*both"):
        probe.measure(tiny_net, [(torch.ones(1, 2), torch.tensor([0]))], blocks=[same], progress=False)


# -- inputs torch would reject with its own errors ---------------------------------------------


def _tiny_data(dtype=torch.float32, targets=None):
    torch.manual_seed(2)
    inputs = torch.randn(6, 2).to(dtype)
    return [(inputs, torch.tensor([0, 1, 1, 0, 1, 0]) if targets is None else targets)]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_integer_targets_of_any_width_are_class_labels(tiny_net, dtype):
    """no stale or mixed numbers: int32/int16/uint8 labels give the int64 labels' numbers."""
    data = _tiny_data()
    narrow = [(x, y.to(dtype)) for x, y in data]
    pd.testing.assert_frame_equal(probe.sweep(tiny_net, narrow, progress=False),
                                  probe.sweep(tiny_net, data, progress=False))
    pd.testing.assert_frame_equal(probe.measure(tiny_net, narrow, per_class=True, progress=False),
                                  probe.measure(tiny_net, data, per_class=True, progress=False))


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_targets_that_are_not_class_labels_are_refused(tiny_net, dtype):
    """ProbeError naming the value: bool and float targets are not class labels."""
    data = _tiny_data(targets=torch.tensor([0, 1, 1, 0, 1, 0]).to(dtype))
    with pytest.raises(probe.ProbeError, match=f"dtype {dtype}"):
        probe.sweep(tiny_net, data, progress=False)


def test_a_bf16_model_takes_fp32_data():
    """no stale or mixed numbers: floating inputs are cast to the model's dtype, as the user
    would have to; the numbers are those of bf16 data."""
    model = TinyNet().to(torch.bfloat16)
    data, cast = _tiny_data(), _tiny_data(torch.bfloat16)
    pd.testing.assert_frame_equal(probe.measure(model, data, progress=False),
                                  probe.measure(model, cast, progress=False))
    pd.testing.assert_frame_equal(probe.sweep(model, data, progress=False),
                                  probe.sweep(model, cast, progress=False))


@pytest.mark.parametrize("call", ["measure", "sweep", "branch_means"])
def test_a_model_without_weights_is_refused(call):
    """ProbeError naming the value: a model on the meta device has no numbers to measure."""
    with torch.device("meta"):
        model = TinyNet()
    run = {"measure": probe.measure, "sweep": probe.sweep, "branch_means": probe.branch_means}[call]
    with pytest.raises(probe.ProbeError, match="TinyNet.*meta.*has no data; load weights first"):
        run(model, _tiny_data(), progress=False)


def test_numpy_means_work_like_tensors(tiny_net):
    """no stale or mixed numbers: means given as numpy arrays are the same means."""
    data = _tiny_data()
    means = probe.branch_means(tiny_net, data, progress=False)
    arrays = {name: mean.numpy() for name, mean in means.items()}
    pd.testing.assert_frame_equal(probe.sweep(tiny_net, data, mode="mean", means=arrays, progress=False),
                                  probe.sweep(tiny_net, data, mode="mean", means=means, progress=False))
    x = data[0][0]
    with probe.ablated(tiny_net, ["block1"], mode="mean", means=arrays):
        from_arrays = tiny_net(x)
    with probe.ablated(tiny_net, ["block1"], mode="mean", means=means):
        assert torch.equal(from_arrays, tiny_net(x))


def test_means_that_are_not_arrays_are_refused(tiny_net):
    """ProbeError naming the value: a mean must be a tensor or an array."""
    with pytest.raises(probe.ProbeError, match="'block1'.*str"):
        probe.sweep(tiny_net, _tiny_data(), mode="mean", means={"block1": "x", "block2": "y"}, progress=False)


def test_mean_mode_on_a_one_shot_generator_says_why(tiny_net):
    """ProbeError naming the value: the means pass would use the generator up, leaving the
    sweep nothing ("the data is empty" was the wrong diagnosis)."""
    data = _tiny_data()
    with pytest.raises(probe.ProbeError, match="generator.*used up by the means pass.*DataLoader.*means="):
        probe.sweep(tiny_net, (batch for batch in data), mode="mean", progress=False)


# -- run folders: damaged pieces, two runs at once --------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "foreign", "wrong type"])
def test_a_damaged_piece_is_recomputed_with_a_warning(tmp_path, damage):
    """no stale or mixed numbers: a piece that cannot be read back (or is not what it should be)
    is dropped with a warning naming its file, so the run recomputes it."""
    with RunDirectory(tmp_path, {"model": "m"}) as run:
        run.save("measure", pd.DataFrame({"a": range(1000)}))
        path = tmp_path / "partial" / "measure.pt"
        if damage == "truncated":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif damage == "foreign":
            path.write_text("not a pickle\n")
        else:
            run.save("measure", {"a": [1, 2]})
        with pytest.warns(UserWarning, match="measure.pt"):
            assert run.load("measure", kind=pd.DataFrame) is None
        assert not path.exists()
        run.save("measure", pd.DataFrame({"a": [1]}))
        assert run.load("measure", kind=pd.DataFrame)["a"].tolist() == [1]


def test_two_runs_cannot_share_an_out_folder(tmp_path):
    """no stale or mixed numbers: a second run on the folder is refused while the first holds it."""
    first = RunDirectory(tmp_path, {"model": "m"})
    with pytest.raises(probe.ProbeError, match="another probe run is using --out"):
        RunDirectory(tmp_path, {"model": "m"})
    first.close()
    with RunDirectory(tmp_path, {"model": "m"}):
        with pytest.raises(probe.ProbeError, match=str(tmp_path)):
            RunDirectory(tmp_path, {"model": "m"})
    RunDirectory(tmp_path, {"model": "m"}).close()
    assert RunDirectory(tmp_path, {"model": "m"}, writer=False).load("measure") is None  # readers take no lock


@pytest.mark.slow  # Ctrl-C at each line of a whole recalibrated sweep in turn: quadratic in the lines it runs
def test_ctrl_c_at_any_line_of_bn_recalibration_leaves_no_trace():
    """model, flags, hooks and global torch state exactly as before (BN statistics and momenta
    included), wherever a Ctrl-C lands in a sweep with BatchNorm recalibration."""
    from probe.loading.models import cifar_resnet

    torch.manual_seed(0)
    model = cifar_resnet(8, num_classes=3, in_channels=1)
    generator = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, 1, 8, 8, generator=generator), torch.tensor([0, 1, 2, 0, 1, 2]))]
    calibration = [(torch.randn(6, 1, 8, 8, generator=generator), torch.zeros(6, dtype=torch.long))]
    blocks = probe.find_blocks(model)
    run = lambda: probe.evaluate_ablations(model, data, [blocks[:1]], calibration=calibration,  # noqa: E731
                                           progress=False)
    reference = run()
    momenta = {name: m.momentum for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}

    def momenta_unchanged() -> None:
        assert {n: m.momentum for n, m in model.named_modules() if n in momenta} == momenta

    _interrupt_at_every_line(model, run, momenta_unchanged)
    assert run().sets[0].accuracy == reference.sets[0].accuracy


def test_recalibration_names_labels_the_model_cannot_take():
    """ProbeError naming the value: as without recalibration, not torch's IndexError."""
    from probe.loading.models import cifar_resnet

    model = cifar_resnet(8, num_classes=3, in_channels=1).eval()
    data = [(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 7]))]
    with pytest.raises(probe.ProbeError, match="7"):
        probe.evaluate_ablations(model, data, [["layer1.0"]], calibration=data, progress=False)


def test_the_noise_band_counts_the_samples_each_deletion_was_evaluated_on():
    """No stale or mixed numbers: a tied block is measured twice per input, but deleting it is
    evaluated once per input; the noise band uses the evaluated count."""
    model = TiedNet().eval()
    data = [(torch.randn(50, 2, generator=torch.Generator().manual_seed(0)), torch.randint(0, 2, (50,)))]
    table = probe.block_table(model, data, progress=False)
    assert table["samples"].tolist() == [50]
    assert (table["measured_samples"] + table["nonfinite"]).tolist() == [100]  # two calls per input
    assert table["noise"].iloc[0] >= 1 / 50


def test_block_table_of_a_model_at_chance_has_no_verdicts():
    """No stale or mixed numbers: no verdict the data cannot support; probe.block_table marks every
    block of a model at chance unsupported."""
    from probe.loading.models import cifar_resnet

    torch.manual_seed(0)
    model = cifar_resnet(8, num_classes=4, in_channels=1).eval()
    data = [(torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(40) % 4)]
    baseline = probe.sweep(model, data, progress=False).attrs["baseline"]["accuracy"]
    assert baseline <= 0.25 + 2 * (0.25 * 0.75 / 40) ** 0.5  # random weights: at chance
    table = probe.block_table(model, data, progress=False)
    assert set(table["verdict"]) == {"unsupported"} and "chance" in table.attrs["unsupported"]


# -- threads on different models: fx's process-wide patches ----------------------------------


def test_threads_sweeping_different_models_get_the_single_threaded_numbers():
    """no stale or mixed numbers: torch.fx patches nn.Module for the whole process while a fast
    sweep traces; sweeps of other models in other threads meanwhile neither raise (fx's
    "module is not installed as a submodule") nor see the patches, and get the numbers of one
    thread alone; torch's global state is as before afterwards."""
    data = trip_data()
    expected = probe.sweep(trip_net(train=False), data, progress=False)
    models = [[trip_net(train=False) for _ in range(5)] for _ in range(8)]  # fresh: each is traced
    world = global_state()
    tables, errors = [], []

    def work(own: list) -> None:
        try:
            tables.extend(probe.sweep(model, data, progress=False) for model in own)
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(own,)) for own in models]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads take turns often: traces and forwards interleave
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        sys.setswitchinterval(interval)
    assert errors == [] and len(tables) == 40
    for table in tables:
        pd.testing.assert_frame_equal(table, expected)
        assert table.attrs["baseline"] == expected.attrs["baseline"]
    assert global_state() == world


class _Pause(nn.Module):
    """Identity; while torch.fx traces it, it holds the trace until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.tracing, self.release = threading.Event(), threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            self.tracing.set()
            self.release.wait(timeout=600)  # a guard against a hang only: the test releases it
        return x


def test_a_probe_call_while_another_thread_traces_is_not_traced():
    """no stale or mixed numbers: a measure and a sweep of one model, run while another thread's
    find_blocks holds torch.fx's patches on nn.Module, give the numbers they give alone."""
    data = trip_data()
    other = trip_net(train=False)
    blocks = probe.find_blocks(other)
    expected = (probe.measure(other, data, blocks=blocks, progress=False),
                probe.sweep(other, data, blocks=blocks, fast=False, progress=False))
    traced = trip_net(train=False)
    pause = _Pause()
    traced.blocks.insert(1, pause)
    found = {}
    thread = threading.Thread(target=lambda: found.update(blocks=probe.find_blocks(traced)))
    thread.start()
    try:
        assert pause.tracing.wait(timeout=20)  # the other thread is inside its trace now
        during = (probe.measure(other, data, blocks=blocks, progress=False),
                  probe.sweep(other, data, blocks=blocks, fast=False, progress=False))
        held = thread.is_alive()  # the trace was still under way for all of it
    finally:
        pause.release.set()
        thread.join(timeout=600)
    assert held
    pd.testing.assert_frame_equal(during[0], expected[0])
    pd.testing.assert_frame_equal(during[1], expected[1])
    assert [block.name for block in found["blocks"]] == ["blocks.0", "blocks.2"]


# -- specs, modes and block names that are not there ---------------------------------------


@pytest.mark.parametrize("spec", ["block1=branch;block1=branch", "block1=branch;block1#0=branch",
                                  "block1#0=left;block1#0=right"])
def test_a_spec_naming_one_block_twice_is_refused(tiny_net, spec):
    """ProbeError naming the value: one block given twice would be two identical rows
    (block1[0] and block1[1]), each deleted alone."""
    with pytest.raises(probe.ProbeError, match=r"names block 'block1' .*twice.*'block1\[0\]' and 'block1\[1\]'"):
        probe.find_blocks(tiny_net, spec=spec)
    assert [b.name for b in probe.find_blocks(tiny_net, spec="block1=branch;block2=branch")] == ["block1", "block2"]


def test_an_unknown_ablation_mode_is_refused(tiny_net):
    """ProbeError naming the value: a mode other than zero or mean, in sweep and in ablated."""
    with pytest.raises(probe.ProbeError, match="unknown ablation mode 'bogus'"):
        probe.sweep(tiny_net, _tiny_data(), mode="bogus", progress=False)
    with pytest.raises(probe.ProbeError, match="unknown ablation mode 'bogus'"):
        with probe.ablated(tiny_net, ["block1"], mode="bogus"):
            pass


def test_an_unknown_block_name_is_refused(tiny_net):
    """ProbeError naming the value: a block the model does not have, with the ones it has."""
    before = snapshot(tiny_net)
    for call in (lambda: probe.sweep(tiny_net, _tiny_data(), blocks=["nope"], progress=False),
                 lambda: probe.measure(tiny_net, _tiny_data(), blocks=["nope"], progress=False)):
        with pytest.raises(probe.ProbeError, match="unknown block 'nope'.*block1, block2"):
            call()
    with pytest.raises(probe.ProbeError, match="unknown block 'nope'"):
        with probe.ablated(tiny_net, ["nope"]):
            pass
    assert_unchanged(tiny_net, before)


def test_a_data_set_of_zero_samples_is_refused(tiny_net):
    """ProbeError naming the value: a DataLoader over an empty data set yields no batch."""
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 2),
                                                                       torch.zeros(0, dtype=torch.long)))
    for run in (probe.measure, probe.sweep, probe.branch_means):
        with pytest.raises(probe.ProbeError, match="the data is empty: it yielded no batch"):
            run(tiny_net, empty, progress=False)


# -- dtypes, and the user's own settings -----------------------------------------------------


def test_a_half_precision_model_on_the_cpu_takes_fp32_data():
    """no stale or mixed numbers: an fp16 model on the CPU gets its fp32 data cast to fp16, with
    the numbers of fp16 data, and stays fp16."""
    model = TinyNet().half()
    data, cast = _tiny_data(), _tiny_data(torch.float16)
    pd.testing.assert_frame_equal(probe.measure(model, data, progress=False),
                                  probe.measure(model, cast, progress=False))
    pd.testing.assert_frame_equal(probe.sweep(model, data, progress=False),
                                  probe.sweep(model, cast, progress=False))
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_frozen_parameters_stay_frozen():
    """model, flags, hooks and global torch state exactly as before: parameters the user froze
    (requires_grad False, some of them) keep their flags, and the numbers are those of the
    unfrozen model."""
    model, frozen = TinyNet(), TinyNet()
    frozen.block1.requires_grad_(False)
    frozen.head.bias.requires_grad_(False)
    before, world = snapshot(frozen), global_state()
    for call in ("measure", "sweep", "sweep_mean", "branch_means"):
        result, reference = CALLS[call](frozen, _tiny_data()), CALLS[call](model, _tiny_data())
        if call == "branch_means":
            assert all(torch.equal(result[k], reference[k]) for k in reference)
        else:
            pd.testing.assert_frame_equal(result, reference)
    assert_all_as_before(frozen, before, world)
    assert [p.requires_grad for p in frozen.parameters()] == [False, True, True, False]


def test_a_train_mode_model_is_left_in_train_mode():
    """model, flags, hooks and global torch state exactly as before: measure, branch_means and
    sweep run in eval mode but hand back a model in train mode (with one submodule in eval, as
    the user left it), its BatchNorm statistics untouched."""
    model = trip_net(train=True)
    before, world = snapshot(model), global_state()
    for call in ("measure", "branch_means", "sweep"):
        CALLS[call](model, trip_data())
        assert model.training and model.blocks[0].training and not model.blocks[1].training
    assert_all_as_before(model, before, world)


def test_a_users_forward_hook_stays_attached_and_fires_after():
    """model, flags, hooks and global torch state exactly as before: the user's own hooks stay
    attached through measure and sweep and fire on the user's next forward."""
    model = trip_net(train=False)
    calls = []
    model.blocks[0].register_forward_hook(lambda _m, _a, _o: calls.append("hook"))
    model.register_forward_pre_hook(lambda _m, _a: calls.append("pre"))
    before, world = snapshot(model), global_state()
    for call in ("measure", "sweep", "sweep_mean"):
        CALLS[call](model, trip_data())
    assert_all_as_before(model, before, world)
    calls.clear()
    with torch.no_grad():
        model(trip_data()[0][0])
    assert calls == ["pre", "hook"]


def test_the_users_default_dtype_is_kept():
    """model, flags, hooks and global torch state exactly as before: torch.get_default_dtype()
    set by the user (float64) is float64 after every call."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = trip_net(train=False).float()
        data = [(x.float(), y) for x, y in trip_data()]
        world = global_state()
        for call in ("measure", "sweep", "sweep_mean", "find_blocks"):
            CALLS[call](model, data)
            assert torch.get_default_dtype() == torch.float64
        assert global_state() == world
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("enabled", [False, True])
def test_grad_mode_chosen_by_the_user_is_kept(enabled):
    """model, flags, hooks and global torch state exactly as before: grad mode disabled (or
    enabled) by the user is the same after each call, and the numbers do not depend on it."""
    model = trip_net(train=False)
    expected = probe.sweep(model, trip_data(), progress=False)
    with torch.set_grad_enabled(enabled):
        for call in ("measure", "branch_means", "sweep", "find_blocks"):
            CALLS[call](model, trip_data())
            assert torch.is_grad_enabled() is enabled
        pd.testing.assert_frame_equal(probe.sweep(model, trip_data(), progress=False), expected)


def test_the_deterministic_algorithms_flag_is_kept():
    """model, flags, hooks and global torch state exactly as before: the user's
    torch.use_deterministic_algorithms setting (and its warn_only) is untouched."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        for setting in ((True, True), (False, False)):
            torch.use_deterministic_algorithms(setting[0], warn_only=setting[1])
            model = trip_net(train=False)
            for call in ("measure", "sweep", "sweep_full"):
                CALLS[call](model, trip_data())
                assert (torch.are_deterministic_algorithms_enabled(),
                        torch.is_deterministic_algorithms_warn_only_enabled()) == setting
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


# -- the run record's identity of the data -----------------------------------------------------


class _Items(torch.utils.data.Dataset):
    """A data set of plain items (a dict per sample): fingerprinted item by item."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": index % 2, "name": f"item{index}"}


def test_the_data_fingerprint_notices_every_changed_sample(tmp_path):
    """no stale or mixed numbers: the run record's data_sha256 changes when any one sample
    changes (not only some evenly spaced ones): tensors in memory, items of any form, through a
    Subset, and an image folder's files even at the same size and mtime."""
    from PIL import Image

    from probe.loading.datasets import load_dataset, stratified_subset
    from probe.commands.inputs import data_fingerprint

    images = torch.zeros(40, 1, 4, 4)
    labels = torch.arange(40) % 2
    plain = data_fingerprint(torch.utils.data.TensorDataset(images, labels))
    for index in range(40):
        changed = images.clone()
        changed[index, 0, 3, 3] = 1e-6
        assert data_fingerprint(torch.utils.data.TensorDataset(changed, labels)) != plain, index
        assert data_fingerprint(_Items(changed)) != data_fingerprint(_Items(images)), index
        subset = torch.utils.data.Subset(torch.utils.data.TensorDataset(changed, labels), range(index, 40))
        assert data_fingerprint(subset) != data_fingerprint(torch.utils.data.Subset(
            torch.utils.data.TensorDataset(images, labels), range(index, 40))), index

    for klass in ("a", "b"):
        (tmp_path / klass).mkdir()
        for i in range(20):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / klass / f"{i:02d}.png")
    folder = load_dataset("imagefolder", root=tmp_path)
    before = data_fingerprint(folder)
    sampled = data_fingerprint(stratified_subset(folder, 10, seed=0))
    for name in ("a/01.png", "b/17.png"):  # files the old 16 evenly spaced samples skipped
        path = tmp_path / name
        stat, content = path.stat(), path.read_bytes()
        Image.new("RGB", (8, 8), (200, 0, 0)).save(path)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert data_fingerprint(load_dataset("imagefolder", root=tmp_path)) != before, name
        path.write_bytes(content)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data_fingerprint(load_dataset("imagefolder", root=tmp_path)) == before
    assert data_fingerprint(stratified_subset(load_dataset("imagefolder", root=tmp_path), 10, seed=0)) == sampled
    assert sampled != before


def test_a_sample_of_an_image_folder_is_fingerprinted_by_its_own_files(tmp_path):
    """no stale or mixed numbers, at the cost of the files used: a kept file that changes
    changes the fingerprint of a `--limit` sample; a file left out of it is not read."""
    from PIL import Image

    from probe.loading.datasets import load_dataset
    from probe.commands.inputs import data_fingerprint

    for klass in ("a", "b"):
        (tmp_path / klass).mkdir()
        for i in range(5):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / klass / f"{i}.png")
    folder = load_dataset("imagefolder", root=tmp_path)
    kept = [0, 6]  # a/0.png and b/1.png
    before = data_fingerprint(torch.utils.data.Subset(folder, kept))
    (tmp_path / "a" / "3.png").write_bytes(b"not read")  # not among the kept
    assert data_fingerprint(torch.utils.data.Subset(folder, kept)) == before
    Image.new("RGB", (8, 8), (99, 0, 0)).save(tmp_path / "b" / "1.png")
    assert data_fingerprint(torch.utils.data.Subset(folder, kept)) != before
