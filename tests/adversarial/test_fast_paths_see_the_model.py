"""The fast sweep engines see the model as it is now, hooks and Python attributes included.

`evaluate_ablations` has two fast engines: compiled fx suffixes (`probe.deletion.fast_suffix`,
cached per model across calls) and, for transformers fx cannot trace, a replay of the layers
before a deletion (`probe.deletion.fast_replay`). Each must give the numbers of `fast=False` (one
whole forward of the model per set), which these tests also work out by hand:

- a cached trace is not reused after something it baked in changed: a float attribute, a flag
  choosing a path, a block's own attribute, a hook added to or removed from a container;
- the user's hooks are applied exactly as the model's forward applies them, once: on the model
  itself (a pre-hook on the input, a hook on the logits), on a block, on a container, on a leaf
  layer, and global module hooks; on a language model, a steering hook on a decoder layer;
- a model that writes into its own input gets a fresh copy of the batch for every forward, and
  the caller's data is left as it was (also by `measure`);
- an ordinary model still takes the fast path (its forward is not run once per set), and where
  an engine is given up, `fast_path_note(model)` says which ran and why.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import probe

WIDTH, FEATURES, CLASSES = 8, 5, 4


class MLPBlock(nn.Module):
    """out = x + fc2(relu(fc1(x))); `post` (a Python attribute) may put a tanh after the addition."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(WIDTH, WIDTH)
        self.fc2 = nn.Linear(WIDTH, WIDTH)
        self.post = "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x + self.fc2(torch.relu(self.fc1(x)))
        if self.post == "tanh":
            out = torch.tanh(out)
        return out


class Knobs(nn.Module):
    """A stem, three `MLPBlock`s in a Sequential, a head. `temperature` divides the logits;
    `doubled` (a flag) takes a path that doubles the features before the head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Linear(FEATURES, WIDTH)
        self.blocks = nn.Sequential(*[MLPBlock() for _ in range(3)])
        self.head = nn.Linear(WIDTH, CLASSES)
        self.temperature = 1.0
        self.doubled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        if self.doubled:
            h = h * 2
        return self.head(h) / self.temperature


class WritesItsInput(Knobs):
    """Adds `pre(x)` into its own input, in place, before anything else: `x += pre(x)` (which
    fx traces as an out-of-place addition) or `x.add_(pre(x))` (which it keeps in place)."""

    def __init__(self, how: str = "+=") -> None:
        super().__init__()
        self.pre = nn.Linear(FEATURES, FEATURES)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "+=":
            x += self.pre(x)
        else:
            x.add_(self.pre(x))
        return super().forward(x)


def by_hand(model: Knobs, x: torch.Tensor, skip=frozenset(), *, pre=None, post=None, before_block=None,
            after_block=None, after_blocks=None, linear=None, writes_input: bool = False) -> torch.Tensor:
    """Knobs' forward written out with its weights, leaving out the branches of the blocks in
    `skip` (indices), with the hooks' arithmetic where the model applies it: `pre` on the input,
    `post` on the logits, `before_block[i]` / `after_block[i]` around block i, `after_blocks`
    on the Sequential's output, `linear` on every nn.Linear's output."""
    linear = linear or (lambda out: out)

    def dense(layer: nn.Linear, value: torch.Tensor) -> torch.Tensor:
        return linear(value @ layer.weight.T + layer.bias)

    if pre is not None:
        x = pre(x)
    if writes_input:
        x = x + dense(model.pre, x)
    h = dense(model.stem, x)
    for i, block in enumerate(model.blocks):
        if before_block and i in before_block:
            h = before_block[i](h)
        branch = dense(block.fc2, torch.relu(dense(block.fc1, h)))
        out = h if i in skip else h + branch
        if block.post == "tanh":
            out = torch.tanh(out)
        if after_block and i in after_block:
            out = after_block[i](out)
        h = out
    if after_blocks is not None:
        h = after_blocks(h)
    if model.doubled:
        h = h * 2
    logits = dense(model.head, h) / model.temperature
    return post(logits) if post is not None else logits


def data(batches: int = 2, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, FEATURES, generator=generator) * 2, torch.randint(0, CLASSES, (8,), generator=generator))
            for _ in range(batches)]


NAMES = ["blocks.0", "blocks.1", "blocks.2"]
# Single blocks, and the nested sets of a deletion curve (which run on from the set before).
SETS = [["blocks.0"], ["blocks.1"], ["blocks.2"], ["blocks.1", "blocks.2"], ["blocks.0", "blocks.1", "blocks.2"]]


def expected(model: Knobs, batches: list, **hooks) -> list[tuple[float, float]]:
    """(accuracy, mean cross-entropy) by hand: the intact model, then each of SETS."""
    rows = []
    for skip in [frozenset(), *[frozenset(NAMES.index(n) for n in s) for s in SETS]]:
        with torch.no_grad():
            logits = torch.cat([by_hand(model, x.clone(), skip, **hooks) for x, _ in batches])
        targets = torch.cat([y for _, y in batches])
        rows.append(((logits.argmax(1) == targets).float().mean().item(), F.cross_entropy(logits, targets).item()))
    return rows


def numbers(evaluation) -> list[tuple[float, float]]:
    return [(o.accuracy, o.loss) for o in [evaluation.baseline, *evaluation.sets]]


def assert_numbers(got, want) -> None:
    assert len(got) == len(want)
    for (accuracy, loss), (accuracy_want, loss_want) in zip(got, want):
        assert accuracy == pytest.approx(accuracy_want, abs=1e-6)
        assert loss == pytest.approx(loss_want, rel=1e-5, abs=1e-6)


def fast_and_slow(model, batches, sets=SETS, **options):
    """(fast numbers, slow numbers); the fast call last, so that `note(model)` tells of it."""
    slow = numbers(probe.evaluate_ablations(model, batches, sets, fast=False, progress=False, **options))
    fast = numbers(probe.evaluate_ablations(model, batches, sets, progress=False, **options))
    return fast, slow


def check(model, batches, **hooks) -> list[tuple[float, float]]:
    """The fast engine, the slow one and the hand computation agree; returns the numbers."""
    want = expected(model, batches, **hooks)
    fast, slow = fast_and_slow(model, batches)
    assert_numbers(slow, want)
    assert_numbers(fast, want)
    return fast


def note(model):
    from probe.deletion.evaluation import fast_path_note

    return fast_path_note(model)


# -- 1. a cached trace is not reused once what it baked in has changed ---------------------------------


@pytest.mark.parametrize("change", ["temperature", "flag", "block attribute"])
def test_a_changed_python_attribute_is_seen_by_the_next_sweep(change):
    """A sweep after a Python attribute the forward reads changed gives the new model's numbers,
    not the first sweep's (the trace baked the old value in): a float (temperature 1 -> 4), a
    bool choosing a path, a block's own string attribute (read by its inlined code)."""
    model, batches = Knobs(), data()
    before = check(model, batches)
    if change == "temperature":
        model.temperature = 4.0
    elif change == "flag":
        model.doubled = True
    else:
        model.blocks[1].post = "tanh"
    after = check(model, batches)
    assert after[0][1] != pytest.approx(before[0][1], rel=1e-3) or after[2][1] != pytest.approx(before[2][1], rel=1e-3)
    assert note(model).engine == "suffix"  # rebuilt, not given up


def test_a_hook_added_to_a_container_after_a_sweep_is_applied():
    """A forward hook put on the blocks' Sequential after a first sweep is applied by the next
    one (x 0.5 on the Sequential's output), exactly once; removed again, it is no longer applied."""
    model, batches = Knobs(), data()
    check(model, batches)
    handle = model.blocks.register_forward_hook(lambda _m, _args, out: out * 0.5)
    try:
        check(model, batches, after_blocks=lambda h: h * 0.5)
        # No traced copy (it would run the Sequential's code inline); the replay calls the model.
        assert note(model).engine == "replay" and "'blocks' carries forward hooks" in note(model).reason
    finally:
        handle.remove()
    check(model, batches)
    assert note(model).engine == "suffix" and note(model).reason is None


def test_a_container_hook_present_at_the_first_trace_is_not_baked_in():
    """A container hook present when the model is first swept, then removed: the next sweep
    does not apply it (a trace made with it would carry its arithmetic)."""
    model, batches = Knobs(), data()
    handle = model.blocks.register_forward_hook(lambda _m, _args, out: out + 1.0)
    try:
        check(model, batches, after_blocks=lambda h: h + 1.0)
    finally:
        handle.remove()
    check(model, batches)


# -- 2. the user's hooks, applied as the forward applies them ------------------------------------------


@pytest.mark.parametrize("kind", ["pre-hook on the input", "hook on the logits"])
def test_hooks_on_the_model_itself_are_applied(kind):
    """A forward pre-hook on the model (x -> 5x + 1) and a forward hook on it (logits / 10)
    change the numbers of every set as they change the model's forward; the compiled suffixes,
    a traced copy of the forward, give way to the layer replay (which calls the model), and the
    note says why."""
    model, batches = Knobs(), data()
    check(model, batches)  # a runner is cached from a hook-free sweep
    if kind == "pre-hook on the input":
        handle = model.register_forward_pre_hook(lambda _m, args: (args[0] * 5 + 1,))
        hooks = {"pre": lambda x: x * 5 + 1}
    else:
        handle = model.register_forward_hook(lambda _m, _args, out: out / 10)
        hooks = {"post": lambda logits: logits / 10}
    try:
        check(model, batches, **hooks)
        assert note(model).engine == "replay" and "model itself carries forward hooks" in note(model).reason
    finally:
        handle.remove()


def test_a_hook_on_a_resnet_falls_back_to_whole_forwards():
    """A ResNet (blocks in three stages: no one stack to replay) with a hook on its logits
    (/ 10): the sweep runs whole forwards, with the hook, and says why; its numbers are those of
    `probe.ablated` and a forward, by hand."""
    from probe.loading.models import cifar_resnet

    torch.manual_seed(0)
    model = cifar_resnet(20, num_classes=CLASSES).eval()
    generator = torch.Generator().manual_seed(4)
    batches = [(torch.randn(6, 3, 8, 8, generator=generator), torch.randint(0, CLASSES, (6,), generator=generator))]
    names = [block.name for block in probe.find_blocks(model)]
    sets = [[names[0]], [names[4]], names[3:6]]
    numbers(probe.evaluate_ablations(model, batches, sets, progress=False))  # a runner is cached
    handle = model.register_forward_hook(lambda _m, _args, out: out / 10)
    try:
        fast, slow = fast_and_slow(model, batches, sets)
        assert note(model).engine == "full"
        assert "model itself carries forward hooks" in note(model).reason and "stack of layers" in note(model).reason
        x, y = batches[0]
        want = []
        for deleted in [[], *sets]:
            with torch.no_grad(), probe.ablated(model, deleted):
                logits = model(x)
            want.append(((logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()))
    finally:
        handle.remove()
    assert_numbers(slow, want)
    assert_numbers(fast, want)


def test_a_forward_set_on_the_instance_is_the_one_that_runs():
    """`model.forward = ...` on the instance (logits x 3): fx would trace the class's forward, so
    the traced copy is not used; the numbers are those of the forward the model runs."""
    import types

    model, batches = Knobs(), data()
    check(model, batches)
    model.forward = types.MethodType(lambda self, x: Knobs.forward(self, x) * 3, model)
    check(model, batches, post=lambda logits: logits * 3)
    assert note(model).engine == "replay" and "set on the instance" in note(model).reason


SCALE = 1.0  # a module global that GlobalKnobs' forward reads


class GlobalKnobs(Knobs):
    """Multiplies the logits by the module global `SCALE` and the class attribute `gain`."""

    gain = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * SCALE * self.gain


def test_a_changed_global_or_class_attribute_is_seen_by_the_next_sweep(monkeypatch):
    """A class attribute (`gain` 1 -> 3) and a module global (`SCALE` 1 -> 0.5) that the forward
    reads: the next sweep gives the model's new numbers (fx baked the old ones in)."""
    model, batches = GlobalKnobs(), data()
    before = check(model, batches)
    monkeypatch.setattr(GlobalKnobs, "gain", 3.0)
    tripled = check(model, batches, post=lambda logits: logits * 3.0)
    monkeypatch.setitem(globals(), "SCALE", 0.5)
    check(model, batches, post=lambda logits: logits * 1.5)
    assert note(model).engine == "suffix"
    assert tripled[0][1] != pytest.approx(before[0][1], rel=1e-3)  # the change matters


class Scale:
    """A value held where its changes cannot be seen (no __dict__ to compare)."""

    __slots__ = ("value",)

    def __init__(self, value: float) -> None:
        self.value = value


class Opaque(Knobs):
    def __init__(self) -> None:
        super().__init__()
        self.scale = Scale(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale.value


def test_a_change_nothing_records_is_caught_on_the_first_batch():
    """An attribute held in an object without a __dict__ (its changes cannot be compared): a
    reused trace is checked against a whole forward on the first batch of the call, found stale
    after the value changed (1 -> 3), and traced again; the numbers are the model's."""
    model, batches = Opaque(), data()
    check(model, batches)
    assert note(model).engine == "suffix" and note(model).reason is None  # checked, and still right
    model.scale.value = 3.0
    check(model, batches, post=lambda logits: logits * 3)
    assert note(model).engine == "suffix" and "traced again" in note(model).reason


@pytest.mark.parametrize("kind", ["forward hook", "pre-hook"])
def test_a_hook_on_a_block_is_applied_once_also_when_the_block_is_deleted(kind):
    """A hook on a block's module is applied in every set, also those that delete that block or
    run on from it (x 0.5 on block 1's output, or on its input), once; the fast engine still
    runs (the hooked block's own code is not inlined)."""
    model, batches = Knobs(), data()
    check(model, batches)
    if kind == "forward hook":
        handle = model.blocks[1].register_forward_hook(lambda _m, _args, out: out * 0.5)
        hooks = {"after_block": {1: lambda h: h * 0.5}}
    else:
        handle = model.blocks[1].register_forward_pre_hook(lambda _m, args: (args[0] * 0.5,))
        hooks = {"before_block": {1: lambda h: h * 0.5}}
    try:
        check(model, batches, **hooks)
        assert note(model).engine == "suffix"
        stacked = numbers(probe.evaluate_ablations(model, batches, SETS, stack=3, progress=False))
        assert_numbers(stacked, expected(model, batches, **hooks))
    finally:
        handle.remove()


def test_a_hook_on_a_leaf_layer_keeps_the_fast_engine():
    """A hook on a leaf layer (the head: logits + 1 on class 0) runs where that layer runs, in
    the traced code too: the same numbers, fast."""
    model, batches = Knobs(), data()
    shift = torch.tensor([1.0, 0.0, 0.0, 0.0])
    handle = model.head.register_forward_hook(lambda _m, _args, out: out + shift)
    try:
        check(model, batches, post=lambda logits: logits + shift / model.temperature)
        assert note(model).engine == "suffix"
    finally:
        handle.remove()


def scaled_outputs(module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor | None:
    """A global hook: every nn.Linear's output x 1.1, every Sequential's x 0.5."""
    if isinstance(module, nn.Linear):
        return out * 1.1
    return out * 0.5 if isinstance(module, nn.Sequential) else None


def test_a_global_module_hook_is_applied():
    """A global forward hook (every nn.Linear's output x 1.1, every Sequential's x 0.5) is
    applied as the model applies it, also when it came after a first sweep."""
    model, batches = Knobs(), data()
    check(model, batches)
    handle = torch.nn.modules.module.register_module_forward_hook(scaled_outputs)
    try:
        check(model, batches, linear=lambda out: out * 1.1, after_blocks=lambda h: h * 0.5)
        assert note(model).engine == "replay" and "global module hooks" in note(model).reason
    finally:
        handle.remove()


# -- an ordinary model keeps its fast path ---------------------------------------------------------------


class LinearCalls(TorchFunctionMode):
    """Counts the calls of one nn.Linear layer, by its weight (no hook: a hook is part of the model)."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.weight, self.count = layer.weight, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and len(args) > 1 and args[1] is self.weight:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_a_plain_model_takes_the_fast_path_and_reuses_it(monkeypatch):
    """On a model without hooks, unchanged between calls, the fast path is taken and its trace
    reused: the stem (which every whole forward runs, and no suffix) runs once per batch, in the
    baseline pass, where the slow path runs it once per batch and set; no second trace; the
    numbers are the slow path's and the hand computation's."""
    import probe.deletion.fast_suffix as fast_suffix

    model, batches = Knobs(), data()
    builds = []
    build = fast_suffix.build_runner
    monkeypatch.setattr(fast_suffix, "build_runner", lambda *a, **k: builds.append(1) or build(*a, **k))
    first = numbers(probe.evaluate_ablations(model, batches, SETS, progress=False))
    with LinearCalls(model.stem) as calls:
        fast = numbers(probe.evaluate_ablations(model, batches, SETS, progress=False))
    assert calls.count == len(batches)
    assert note(model).engine == "suffix" and note(model).reason is None
    with LinearCalls(model.stem) as calls:
        slow = numbers(probe.evaluate_ablations(model, batches, SETS, fast=False, progress=False))
    assert calls.count == len(batches) * (1 + len(SETS))
    assert builds == [1]
    assert fast == first
    assert_numbers(fast, slow)
    assert_numbers(fast, expected(model, batches))


# -- 3. the layer replay of a language model ---------------------------------------------------------------


def llama(layers: int = 3):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64)).eval()
    model.config.use_cache = False
    return model


def token_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randint(0, 50, (2, 8), generator=generator) for _ in range(2)]


def lm_loss(model, batches, zeroed=()) -> float:
    """Mean next-token NLL by hand, with the MLPs of the decoder layers in `zeroed` giving zeros."""
    handles = [model.model.layers[i].mlp.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out))
               for i in zeroed]
    try:
        with torch.no_grad():
            losses = [F.cross_entropy(model(ids).logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1),
                                      reduction="sum") for ids in batches]
    finally:
        for handle in handles:
            handle.remove()
    return float(sum(losses)) / sum(ids[:, 1:].numel() for ids in batches)


LM_SETS = [["model.layers.1[mlp]"], ["model.layers.2[self_attn]"], ["model.layers.0[mlp]"]]


def lm_check(model, batches) -> list[float]:
    slow = probe.evaluate_ablations(model, batches, LM_SETS, task="lm", fast=False, progress=False)
    fast = probe.evaluate_ablations(model, batches, LM_SETS, task="lm", progress=False)
    for a, b in zip([fast.baseline, *fast.sets], [slow.baseline, *slow.sets]):
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
    assert fast.baseline.loss == pytest.approx(lm_loss(model, batches), rel=1e-5)
    assert fast.sets[0].loss == pytest.approx(lm_loss(model, batches, zeroed=[1]), rel=1e-5)
    assert fast.sets[2].loss == pytest.approx(lm_loss(model, batches, zeroed=[0]), rel=1e-5)
    return [o.loss for o in [fast.baseline, *fast.sets]]


def test_a_steering_hook_on_a_decoder_layer_is_applied_once_by_the_replay():
    """A forward hook adding a vector to decoder layer 0's output: deleting a block after it
    replays layer 0 from the baseline pass, and the vector is in that output once (not added
    again to the replayed value). The replay still runs."""
    model, batches = llama(), token_batches()
    plain = lm_check(model, batches)
    steer = torch.linspace(-1, 1, 16) * 3
    handle = model.model.layers[0].register_forward_hook(lambda _m, _args, out: out + steer)
    try:
        steered = lm_check(model, batches)
        assert note(model).engine == "replay"
    finally:
        handle.remove()
    assert steered[1] != pytest.approx(plain[1], rel=1e-3)  # the hook matters


def test_hooks_on_the_language_model_and_its_parts_are_applied():
    """A hook on the model's output (logits / 10), a pre-hook on decoder layer 1 (its input
    x 0.5) and a hook on the decoder stack's container (LlamaModel: its hidden states x 2):
    each applied once, as the forward applies it."""
    model, batches = llama(), token_batches()

    def on_logits(_m, _args, out):
        out.logits = out.logits / 10
        return out

    def on_stream(_m, _args, out):
        out.last_hidden_state = out.last_hidden_state * 2
        return out

    handles = [model.register_forward_hook(on_logits),
               model.model.layers[1].register_forward_pre_hook(lambda _m, args, *_: (args[0] * 0.5, *args[1:])),
               model.model.register_forward_hook(on_stream)]
    try:
        lm_check(model, batches)
    finally:
        for handle in handles:
            handle.remove()


class KnobLM(nn.Module):
    """An embedding, three per-position residual layers in a ModuleList, a head over 11 tokens.
    fx cannot trace it (the loop stops on a tensor's value), so sweeps replay its layers.
    `temperature` divides the logits; `doubled` takes a path that doubles the stream."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, WIDTH)
        self.layers = nn.ModuleList([MLPBlock() for _ in range(3)])
        self.head = nn.Linear(WIDTH, 11)
        self.temperature = 1.0
        self.doubled = False

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for layer in self.layers:
            if bool(h.isnan().any()):
                break
            h = layer(h)
        if self.doubled:
            h = h * 2
        return self.head(h) / self.temperature


def test_the_replay_sees_attributes_flags_and_hooks():
    """The layer replay on a model fx cannot trace: after a temperature, a flag and a layer's
    own attribute change, and with a steering hook on layer 0, each sweep equals the slow path."""
    model = KnobLM()
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 11, (2, 6), generator=generator) for _ in range(2)]
    sets = [["layers.0"], ["layers.1"], ["layers.2"], ["layers.1", "layers.2"]]

    def same() -> list[float]:
        slow = probe.evaluate_ablations(model, batches, sets, task="lm", fast=False, progress=False)
        fast = probe.evaluate_ablations(model, batches, sets, task="lm", progress=False)
        for a, b in zip([fast.baseline, *fast.sets], [slow.baseline, *slow.sets]):
            assert a.loss == pytest.approx(b.loss, rel=1e-5)
        assert note(model).engine == "replay"
        return [o.loss for o in [fast.baseline, *fast.sets]]

    first = same()
    model.temperature = 4.0
    model.doubled = True
    model.layers[1].post = "tanh"
    changed = same()
    assert changed[0] != pytest.approx(first[0], rel=1e-3)
    handle = model.layers[0].register_forward_hook(lambda _m, _args, out: out + 1.0)
    try:
        steered = same()
    finally:
        handle.remove()
    assert steered[2] != pytest.approx(changed[2], rel=1e-3)


def test_a_hook_writing_into_a_replayed_output_gives_up_the_replay():
    """A steering hook that adds into layer 0's output in place (returning None): the cached
    value is no longer what the layer's forward returned, and replaying it would add the vector
    twice; the sweep gives up the replay for whole forwards, says so, and equals the slow path."""
    model = KnobLM()
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 11, (2, 6), generator=generator) for _ in range(2)]
    sets = [["layers.1"], ["layers.2"]]

    def add_in_place(_module, _args, out) -> None:
        out.add_(1.0)

    handle = model.layers[0].register_forward_hook(add_in_place)
    try:
        slow = probe.evaluate_ablations(model, batches, sets, task="lm", fast=False, progress=False)
        fast = probe.evaluate_ablations(model, batches, sets, task="lm", progress=False)
    finally:
        handle.remove()
    for a, b in zip([fast.baseline, *fast.sets], [slow.baseline, *slow.sets]):
        assert a.loss == pytest.approx(b.loss, rel=1e-6)
    with torch.no_grad():  # by hand (the hook removed): layer 1 deleted, 1 added once after layer 0
        total = sum(F.cross_entropy(model.head(model.layers[2](model.layers[0](model.embed(ids)) + 1.0))[:, :-1]
                                    .reshape(-1, 11), ids[:, 1:].reshape(-1), reduction="sum") for ids in batches)
    assert fast.sets[0].loss == pytest.approx(total.item() / sum(ids[:, 1:].numel() for ids in batches), rel=1e-5)
    assert note(model).engine == "full" and "modified in place" in note(model).reason


# -- 9. a model that writes into its own input ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["+=", "add_"])
@pytest.mark.parametrize("fast", [True, False])
def test_a_model_writing_into_its_input_gets_a_copy_per_forward(fast, how):
    """`x += pre(x)` on the model's input: every forward gets the batch as the data gave it (a
    copy), so each set's numbers are those of one forward on the original data; the caller's
    tensors are unchanged."""
    model, batches = WritesItsInput(how), data()
    originals = copy.deepcopy(batches)
    want = expected(model, originals, writes_input=True)
    got = numbers(probe.evaluate_ablations(model, batches, SETS, fast=fast, progress=False))
    for (x, y), (x0, y0) in zip(batches, originals):
        assert torch.equal(x, x0) and torch.equal(y, y0)
    assert_numbers(got, want)
    for _ in range(2):  # the same through sweep, twice (the second with a cached runner)
        table = probe.sweep(model, batches, blocks=NAMES, progress=False)
    assert table["accuracy"].tolist() == pytest.approx([a for a, _ in want[1:4]])
    for (x, _), (x0, _) in zip(batches, originals):
        assert torch.equal(x, x0)
    if not fast:
        return
    assert note(model).inputs_copied == (how == "add_")  # fx's trace of `x += ...` writes nothing


def test_measure_leaves_the_callers_data_as_it_was():
    """`measure` and `branch_means` on the model that writes into its input: the caller's
    tensors are unchanged, and block 0's ratio and mean branch are those of one forward on the
    original data (by hand)."""
    model, batches = WritesItsInput(), data()
    originals = copy.deepcopy(batches)
    table = probe.measure(model, batches, progress=False)
    means = probe.branch_means(model, batches, blocks=NAMES, progress=False)
    for (x, _), (x0, _) in zip(batches, originals):
        assert torch.equal(x, x0)
    with torch.no_grad():
        ratios, branches = [], []
        for x, _ in originals:
            x = x + model.pre(x)
            h = model.stem(x)
            block = model.blocks[0]
            branch = block.fc2(torch.relu(block.fc1(h)))
            ratios.append(branch.norm(dim=1) / h.norm(dim=1))
            branches.append(branch)
    assert table.set_index("block").loc["blocks.0", "ratio"] == pytest.approx(torch.cat(ratios).mean().item(), rel=1e-5)
    assert torch.allclose(means["blocks.0"], torch.cat(branches).mean(dim=0), atol=1e-6)


def test_the_run_record_says_how_the_sweep_ran(tiny_net):
    """The run record names the sweep's engine, and why not a faster one (the report's "sweep
    engine" row); a run read back from its pieces says so."""
    from probe.ablate import _engine_words
    from tiny_models import tiny_data

    probe.sweep(tiny_net, tiny_data(), progress=False)
    note = probe.fast_path_note(tiny_net)
    assert note.engine == "suffix" and note.reason is None and not note.inputs_copied
    assert _engine_words(note) == "compiled suffixes (only the network after each deleted block runs)"
    handle = tiny_net.register_forward_hook(lambda _m, _i, out: out * 2)
    try:
        probe.sweep(tiny_net, tiny_data(), progress=False)
        hooked = probe.fast_path_note(tiny_net)
    finally:
        handle.remove()
    assert hooked.engine != "suffix" and "hooks" in hooked.reason
    assert _engine_words(hooked).endswith(hooked.reason)
    assert _engine_words(None) == "read back from the run folder's saved pieces"
