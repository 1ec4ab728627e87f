"""Hypothesis-driven fuzzing of the public API's arguments: every bad value gets a ProbeError
that names it, every good value works, and the model is never changed either way."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import probe
from probe.loading.datasets import DATASETS, load_dataset, make_loader
from probe.loading.models import MODEL_NAMES, build_model
from tiny_models import TinyNet, assert_unchanged, snapshot

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
X = torch.tensor([[3.0, 4.0], [1.0, 1.0], [0.3, 1.0]])
DATA = [(X, torch.tensor([0, 1, 1]))]


@SETTINGS
@given(names=st.lists(st.one_of(st.sampled_from(["block1", "block2"]), st.text(max_size=12)), min_size=1, max_size=3))
def test_block_names(names):
    model = TinyNet()
    before = snapshot(model)
    unknown = [n for n in names if n not in ("block1", "block2")]
    try:
        with probe.ablated(model, names):
            out = model(X)
        assert not unknown
        assert out.shape == (3, 2)
    except probe.ProbeError as error:
        assert unknown and repr(unknown[0]) in str(error)
        assert "block1" in str(error)  # says what exists
    assert_unchanged(model, before)


@SETTINGS
@given(mode=st.one_of(st.sampled_from(["zero", "mean"]), st.text(max_size=8)))
def test_modes(mode):
    model = TinyNet()
    before = snapshot(model)
    try:
        table = probe.sweep(model, DATA, mode=mode, progress=False)
        assert mode in ("zero", "mean") and len(table) == 2
    except probe.ProbeError as error:
        assert mode not in ("zero", "mean") and repr(mode) in str(error)
    assert_unchanged(model, before)


@SETTINGS
@given(batch=st.one_of(
    st.tuples(st.just(X), st.just(torch.tensor([0, 1, 1]))),
    st.tuples(st.just(X), st.just(torch.tensor([0.0, 1.0, 1.0]))),  # float targets
    st.tuples(st.just(X), st.just(torch.tensor([0, 1]))),            # one target short
    st.tuples(st.just(X)),                                           # no targets
    st.tuples(st.just(X), st.just(torch.tensor([0, 1, 1])), st.just(1)),
    st.just(X),
    st.tuples(st.just(X.tolist()), st.just([0, 1, 1])),              # lists, not tensors
))
def test_batch_shapes(batch):
    """Measuring needs inputs alone; classifying needs one integer label per input (extra
    items after the targets are allowed)."""
    model = TinyNet()
    before = snapshot(model)
    tensor_inputs = isinstance(batch, torch.Tensor) or isinstance(batch[0], torch.Tensor)
    labelled = isinstance(batch, tuple) and len(batch) >= 2 and tensor_inputs and isinstance(batch[1], torch.Tensor) \
        and not batch[1].dtype.is_floating_point and len(batch[1]) == len(batch[0])
    for call, good in ((probe.measure, tensor_inputs), (probe.sweep, labelled)):
        try:
            call(model, [batch], progress=False)
            assert good
        except probe.ProbeError as error:
            assert not good and "batch 1" in str(error)
    assert_unchanged(model, before)


@SETTINGS
@given(name=st.text(min_size=1, max_size=12))
def test_unknown_dataset_names(name):
    try:
        load_dataset(name, split="test")
        assert name in DATASETS
    except probe.ProbeError as error:
        assert repr(name) in str(error) or name in str(error)


@SETTINGS
@given(name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=12))
def test_unknown_model_names(name):
    if name in MODEL_NAMES:
        return
    try:
        build_model(name, num_classes=3)
    except probe.ProbeError as error:
        assert name in str(error)
    else:
        assert name.startswith(("resnet", "plain"))  # any 6n+2 depth is a valid CIFAR-style name


@SETTINGS
@given(batch_size=st.integers(-3, 5), limit=st.one_of(st.none(), st.integers(-3, 5)))
def test_loader_arguments(batch_size, limit):
    dataset = torch.utils.data.TensorDataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))
    try:
        loader = make_loader(dataset, batch_size=batch_size, limit=limit)
        assert batch_size >= 1 and (limit is None or limit >= 1)
        assert sum(len(y) for _, y in loader) == min(4, limit or 4)
    except probe.ProbeError as error:
        assert str(batch_size) in str(error) or str(limit) in str(error)
