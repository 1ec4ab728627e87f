"""The representation analysis against numbers worked out by hand: CKA's invariances and its
streaming sums, linear probes, the logit lens and refinement cosines on tiny models; its
figures, report section and command."""

from __future__ import annotations

import dataclasses

import importlib
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from torch import nn  # noqa: E402

import probe  # noqa: E402
from analyses.representation import (CkaAccumulator, RepresentationResult, _Rows, block_classes, cka,  # noqa: E402
                                     linear_probes, head_lens, pool, refinement, representation, stages, summary)
from reports.sections.representation import story  # noqa: E402
from tiny_models import LinearBlock, assert_unchanged, snapshot  # noqa: E402
from probe.loading.checkpoints import save_checkpoint  # noqa: E402
from probe.loading.models import cifar_resnet  # noqa: E402
from probe.scoring.results import Evaluation, Outcome  # noqa: E402
from reports import figures, sections  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def batched(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


# --- pooling and stages -----------------------------------------------------------------------


def test_pool_averages_positions_by_layout():
    image = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    # sample 0, channel 0 holds 0..3 (mean 1.5); channel 1 holds 4..7 (5.5); sample 1 starts at 12.
    assert pool(image).tolist() == [[1.5, 5.5, 9.5], [13.5, 17.5, 21.5]]
    sequence = torch.tensor([[[1.0, 2.0], [3.0, 6.0]]])  # (batch 1, positions 2, features 2)
    assert pool(sequence).tolist() == [[2.0, 4.0]]
    flat = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    assert pool(flat).dtype == torch.float32 and pool(flat).tolist() == [[1.0, -1.0]]
    with pytest.raises(probe.ProbeError, match="no features"):
        pool(torch.ones(4))


def test_stages_start_at_shortcuts_that_are_not_the_identity():
    blocks = probe.find_blocks(cifar_resnet(14, num_classes=3, in_channels=1))  # 2 blocks per stage
    assert [b.name for b in blocks] == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1"]
    assert stages(blocks, [None] * 6) == [1, 1, 2, 2, 3, 3]  # no shapes known: the shortcuts alone


def test_stages_start_where_the_output_shape_changes():
    # Identity shortcuts only (as in YOLO): the shape alone starts a stage, in size or in width.
    blocks = [probe.Block(name=f"b{i}", module=f"b{i}", branch=f"b{i}.f", shortcut=None, position=i)
              for i in range(5)]
    shapes = [(8, 32, 32), (8, 32, 32), (16, 32, 32), (16, 16, 16), None]
    assert stages(blocks, shapes) == [1, 1, 2, 3, 3]  # None: unknown, no change read from it
    with pytest.raises(probe.ProbeError, match="2 output shape"):
        stages(blocks, shapes[:2])


def test_a_language_models_layers_are_one_stage():
    # A decoder's MLP block adds the residual stream as the attention block left it: its shortcut
    # names that block, an identity for stages; all positions keep one width.
    from tiny_models import tiny_llama

    model = tiny_llama(layers=3)
    blocks = probe.find_blocks(model, example_input=torch.tensor([[1, 2, 3, 4]]))
    assert [b.shortcut for b in blocks][1] == blocks[0].name  # the stream, named by its block
    assert stages(blocks, [(4, 16)] * len(blocks)) == [1] * 6
    # A projection (a module of its own) still starts one.
    projected = [blocks[0], dataclasses.replace(blocks[1], shortcut="model.proj")]
    assert stages(projected, [None, None]) == [1, 2]


def test_resnet20_keeps_three_stages_of_three():
    model = cifar_resnet(20, num_classes=3, in_channels=1)
    data = [torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))]
    table = cka(model, data, progress=False)
    firsts = table.drop_duplicates("block_a")
    assert firsts["stage_a"].tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3]


def _yolo_stages_by_hand(model: nn.Module, size: int) -> tuple[list[int], list[int]]:
    """(resolution, stage) of each Bottleneck with a shortcut, from the model's layers alone: the
    backbone runs its layers in order, each strided convolution divides the resolution; a stage
    is a run of one (resolution, width)."""
    from ultralytics.nn.modules import C2f, Conv
    resolution, seen = size, []
    for layer in model.model:
        if isinstance(layer, Conv):
            resolution //= layer.conv.stride[0]
        elif isinstance(layer, C2f):
            seen += [(resolution, unit.cv2.conv.out_channels) for unit in layer.m if unit.add]
        if layer.f != -1:
            break  # the head starts (its first Concat takes a backbone layer's output)
    numbers, previous = [], None
    for key in seen:
        numbers.append((numbers[-1] if numbers else 0) + (key != previous))
        previous = key
    return [r for r, _ in seen], numbers


def test_yolov8n_stages_follow_the_resolution():
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    torch.manual_seed(0)
    model = tasks.DetectionModel("yolov8n.yaml", verbose=False).eval()
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    blocks = probe.find_blocks(model, example_input=x)
    resolutions, expected = _yolo_stages_by_hand(model, 128)
    assert resolutions == [32, 16, 16, 8, 8, 4] and expected == [1, 2, 2, 3, 3, 4]
    assert len(blocks) == 6 and all(b.shortcut is None for b in blocks)  # no shortcut tells a stage here
    before = snapshot(model)
    table = cka(model, [x], blocks=blocks, progress=False)
    assert table.drop_duplicates("block_a")["stage_a"].tolist() == expected
    assert_unchanged(model, before)


def test_a_detectors_stage_statements_follow_the_resolution():
    """The representation of YOLOv8n under the detection task: its summary's stages, and the
    story's CKA "within a stage", are those of the resolution; refinement is left out (a count
    of detections has no gradient), CKA stays."""
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    from analyses.representation.iterative_refinement import NO_DETECTION_REFINEMENT
    from probe.scoring.detection import Detection
    torch.manual_seed(0)
    model = tasks.DetectionModel("yolov8n.yaml", verbose=False).eval()
    x = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    blocks = probe.find_blocks(model, example_input=x[:1])
    table = pd.DataFrame({"block": [b.name for b in blocks], "position": range(6), "ratio": 0.5,
                          "detections_lost": [0.1, 0.9, 0.0, 0.3, 0.2, 0.5], "verdict": "helps"})
    result = representation(model, [x[:3], x[3:]], table=table, blocks=blocks, task=Detection(), progress=False)
    assert result.summary["stage"].tolist() == [1, 2, 2, 3, 3, 4]
    assert result.notes["refinement"] == NO_DETECTION_REFINEMENT and len(result.refinement) == 0
    assert "class label per image" in result.notes["probes"]
    pairs = result.cka.set_index(["block_a", "block_b"])["cka"]
    names = [b.name for b in blocks]
    neighbours = [pairs[(names[1], names[2])], pairs[(names[3], names[4])]]  # the only same-stage neighbours
    within = neighbours  # each of stages 2 and 3 holds one pair; stages 1 and 4 hold one block
    across = [pairs[(a, b)] for i, a in enumerate(names) for b in names[i + 1:]
              if (a, b) not in ((names[1], names[2]), (names[3], names[4]))]
    (line,) = [line for line in story(result) if line.startswith("Linear CKA between neighbouring")]
    assert line == (f"Linear CKA between neighbouring blocks of one stage averages {np.mean(neighbours):.2f} (all "
                    f"pairs within a stage: {np.mean(within):.2f}; pairs from different stages: "
                    f"{np.mean(across):.2f}).")


# --- CKA ----------------------------------------------------------------------------------------


def cka_of(*features: torch.Tensor, batch: int | None = None) -> np.ndarray:
    accumulator = CkaAccumulator()
    n = len(features[0])
    step = batch or n
    for start in range(0, n, step):
        accumulator.add([f[start:start + step] for f in features])
    return accumulator.matrix()


def test_cka_by_hand_in_one_dimension():
    # One feature each: linear CKA is the squared correlation. x - mean = (-1, 0, 1),
    # y - mean = (0, -1, 1): x.y = 1, |x|^2 = |y|^2 = 2, so CKA = 1^2 / (2 * 2) = 0.25.
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [0.0], [2.0]])
    assert cka_of(x, y)[0, 1] == pytest.approx(0.25, abs=1e-15)


def test_cka_is_one_for_the_same_representation_scaled_rotated_and_shifted():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))  # orthogonal
    values = cka_of(x, x, 3.0 * x, x @ rotation, -0.5 * x @ rotation + 7.0)
    np.testing.assert_allclose(values, np.ones((5, 5)), atol=1e-12)


def test_cka_of_independent_representations_falls_toward_zero():
    # For independent isotropic X (n, p) and Y (n, q): each entry of Xc^T Yc has variance about n,
    # so ||Xc^T Yc||^2 ~ n p q, while ||Xc^T Xc|| ~ n sqrt(p): CKA ~ sqrt(p q) / n.
    g = torch.Generator().manual_seed(1)
    seen = {}
    for n in (100, 1000, 10000):
        x, y = torch.randn(n, 4, generator=g), torch.randn(n, 9, generator=g)
        seen[n] = cka_of(x, y)[0, 1]
        assert math.sqrt(4 * 9) / n / 3 < seen[n] < 3 * math.sqrt(4 * 9) / n
    assert seen[100] > seen[1000] > seen[10000] and seen[10000] < 0.002


def test_streaming_equals_all_at_once():
    """Sums over batches give the all-at-once CKA, whatever the batches; it equals the
    Gram-matrix (HSIC) form computed here independently, over n x n kernels."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(37, 3, generator=g) + 5.0
    y = x[:, :2] ** 2 + 0.3 * torch.randn(37, 2, generator=g)
    z = torch.randn(37, 6, generator=g)
    whole = cka_of(x, y, z)
    for batch in (1, 5, 36):
        np.testing.assert_allclose(cka_of(x, y, z, batch=batch), whole, rtol=1e-12, atol=1e-15)
    h = np.eye(37) - 1.0 / 37  # centring matrix

    def hsic(a: torch.Tensor, b: torch.Tensor) -> float:
        a64, b64 = a.double().numpy(), b.double().numpy()
        return float(np.trace(a64 @ a64.T @ h @ b64 @ b64.T @ h))

    features = (x, y, z)
    for i, a in enumerate(features):
        for j, b in enumerate(features):
            assert whole[i, j] == pytest.approx(hsic(a, b) / math.sqrt(hsic(a, a) * hsic(b, b)), rel=1e-10)


def test_cka_with_fewer_samples_than_features_keeps_the_samples():
    """A language model's blocks have more features than a run has windows: the accumulator then
    keeps the samples (never a features x features matrix) and gives the same CKA."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 40, generator=g), torch.randn(6, 30, generator=g)
    y[:, :10] += 2 * x[:, :10]
    accumulator = CkaAccumulator()
    for start in (0, 2, 4):
        accumulator.add([x[start:start + 2], y[start:start + 2]])
    assert accumulator.products is None  # 6 samples, 70 features: no (70, 70) sums
    xc, yc = x.double() - x.double().mean(dim=0), y.double() - y.double().mean(dim=0)
    expected = (xc.T @ yc).square().sum() / ((xc.T @ xc).square().sum() * (yc.T @ yc).square().sum()).sqrt()
    assert accumulator.matrix()[0, 1] == pytest.approx(float(expected), rel=1e-10)


def test_cka_of_a_constant_representation_is_undefined():
    values = cka_of(torch.ones(5, 2), torch.arange(5.0).view(5, 1))
    assert np.isnan(values[0, 1]) and values[1, 1] == 1.0
    with pytest.raises(probe.ProbeError, match="at least one batch"):
        CkaAccumulator().matrix()


def square_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    # Centred, x0 and x1 are (+-1, +-1) in every combination: uncorrelated, of equal variance.
    x = torch.tensor([[1.0, 1.0], [1.0, 3.0], [3.0, 1.0], [3.0, 3.0]])
    return batched(x, torch.tensor([0, 1, 0, 1]), 3)


def test_cka_between_the_blocks_of_tiny_net(tiny_net):
    # Outputs F + s for positive inputs: block1 (2 x0, x1), block2 (2 x0, x1 / 2). Centred: (+-2, +-1)
    # and (+-2, +-0.5). Summed over the 4 samples: Xc^T Yc = diag(16, 2), Xc^T Xc = diag(16, 4),
    # Yc^T Yc = diag(16, 1); CKA = (16^2 + 2^2) / sqrt((16^2 + 4^2) (16^2 + 1^2)).
    before = snapshot(tiny_net)
    table = cka(tiny_net, square_data(), progress=False)
    assert_unchanged(tiny_net, before)
    expected = 260 / math.sqrt(272 * 257)
    assert table["cka"].tolist() == pytest.approx([1.0, expected, expected, 1.0])
    assert table[["block_a", "block_b"]].values.tolist() == [["block1", "block1"], ["block1", "block2"],
                                                             ["block2", "block1"], ["block2", "block2"]]
    assert set(table["samples"]) == {4} and set(table["stage_a"]) == {1}


# --- linear probes --------------------------------------------------------------------------------


def separable() -> tuple[list, list]:
    """Class 1 iff x0 > 2.25, with x1 carrying no class information: every block's output keeps x0
    (2 x0 after block1), so a linear probe separates the classes."""
    low, high, other = [0.5, 1.0, 1.5], [3.0, 3.5, 4.0], [1.0, 2.0, 3.0]
    x = torch.tensor([[a, b] for a in low + high for b in other])
    y = torch.tensor([int(a > 2.25) for a in low + high for _ in other])
    test_x = torch.tensor([[1.2, 0.7], [0.9, 2.5], [3.3, 1.1], [3.8, 2.9]])
    return batched(x, y, 5), batched(test_x, torch.tensor([0, 0, 1, 1]), 3)


def test_a_linear_probe_on_separable_features_scores_everything(tiny_net):
    train, test = separable()
    before = snapshot(tiny_net)
    table = linear_probes(tiny_net, test, train_data=train, progress=False)
    assert_unchanged(tiny_net, before)
    assert table["block"].tolist() == ["block1", "block2"]
    assert table["train_accuracy"].tolist() == [1.0, 1.0] and table["test_accuracy"].tolist() == [1.0, 1.0]
    # The first block's input (x itself) is just as separable: no gain anywhere.
    assert table["previous_test_accuracy"].tolist() == [1.0, 1.0] and table["gain"].tolist() == [0.0, 0.0]
    assert table[["width", "train_samples", "test_samples"]].values.tolist() == [[2, 18, 4], [2, 18, 4]]


def test_a_linear_probe_on_samples_with_both_labels_scores_half(tiny_net):
    # Each evaluation sample appears twice, once with each label: whatever a probe predicts for
    # it, exactly one of the two is right, so every probe scores 50%.
    train, _ = separable()
    x = torch.tensor([[1.0, 1.0], [3.5, 2.0], [2.0, 0.5]]).repeat(2, 1)
    test = batched(x, torch.tensor([0, 0, 0, 1, 1, 1]), 4)
    table = linear_probes(tiny_net, test, train_data=train, progress=False)
    assert table["test_accuracy"].tolist() == [0.5, 0.5] and table["previous_test_accuracy"].tolist() == [0.5, 0.5]


def test_rows_grow_into_one_array():
    rows = _Rows()
    for start, stop in ((0, 3), (3, 1500), (1500, 1501)):  # the second add outgrows the first 1024 rows
        rows.add(np.arange(start, stop, dtype=np.float32).reshape(-1, 1).repeat(2, axis=1))
    assert rows.value().shape == (1501, 2) and (rows.value()[:, 1] == np.arange(1501)).all()


def test_linear_probes_need_two_classes(tiny_net):
    data = [(torch.ones(3, 2), torch.zeros(3, dtype=torch.long))]
    with pytest.raises(probe.ProbeError, match="two classes"):
        linear_probes(tiny_net, data, train_data=data, progress=False)


# --- logit lens ---------------------------------------------------------------------------------


def test_logit_lens_by_hand(tiny_net):
    # TinyNet's head is the identity. Block outputs (before the ReLU): block1 (2 x0, x1), block2
    # (2 x0, x1 / 2), which is also the final logits here (all positive):
    #   x = (1, 1.5):   block1 (2, 1.5) -> 0, block2 (2, 0.75) -> 0, final 0, label 0
    #   x = (0.5, 1.5): block1 (1, 1.5) -> 1, block2 (1, 0.75) -> 0, final 0, label 0
    #   x = (0.2, 1):   block1 (0.4, 1) -> 1, block2 (0.4, 0.5) -> 1, final 1, label 1
    data = [(torch.tensor([[1.0, 1.5], [0.5, 1.5], [0.2, 1.0]]), torch.tensor([0, 0, 1]))]
    before = snapshot(tiny_net)
    table = head_lens(tiny_net, data, progress=False)
    assert_unchanged(tiny_net, before)
    assert table["applicable"].tolist() == [True, True] and table["reason"].tolist() == ["", ""]
    assert table["accuracy"].tolist() == pytest.approx([2 / 3, 1.0])
    assert table["agreement"].tolist() == pytest.approx([2 / 3, 1.0])


def test_logit_lens_says_which_blocks_it_cannot_apply_to():
    torch.manual_seed(0)
    model = cifar_resnet(8, num_classes=3, in_channels=1).eval()  # widths 16, 32, 64; fc takes 64
    data = [(torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2]))]
    table = head_lens(model, data, progress=False).set_index("block")
    assert table["applicable"].tolist() == [False, False, True]
    assert table.loc["layer1.0", "reason"] == "its output has 16 features; the head fc takes 64"
    assert np.isnan(table.loc["layer2.0", "accuracy"])
    # The last block's lens sees the sum before the block's ReLU; the model sees it after.
    with torch.no_grad():
        h = model.layer2(model.layer1(model.relu(model.bn1(model.conv1(data[0][0])))))
        block = model.layer3[0]
        out = block.bn2(block.conv2(block.relu1(block.bn1(block.conv1(h))))) + block.shortcut(h)
        lens = model.fc(out.mean(dim=(2, 3))).argmax(1)
        final = model(data[0][0]).argmax(1)
    assert table.loc["layer3.0", "accuracy"] == (lens == data[0][1]).sum().item() / 6
    assert table.loc["layer3.0", "agreement"] == (lens == final).sum().item() / 6


class PaddedHead(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 1))  # 3 outputs from 2 features: no nn.Linear gives them


def test_logit_lens_without_a_head(tiny_net):
    tiny_net.head = PaddedHead()
    table = head_lens(tiny_net, [(torch.ones(2, 2), torch.tensor([0, 2]))], progress=False)
    assert not table["applicable"].any() and table["accuracy"].isna().all()
    assert set(table["reason"]) == {"the model has no nn.Linear with one output per class (its head)"}


# --- refinement ---------------------------------------------------------------------------------


class DownhillNet(nn.Module):
    """Two linear residual blocks and the head W = [[1, 0], [-1, 0]].

    dL/d(out2) = W^T (p - y) = (2 (p0 - y0), 0). Block2 (A2 = diag(0, 1)): dL/dh2 = (I + A2)^T that
    = (2 (p0 - y0), 0), while F2 = (0, h2_1): cosine 0. Block1 (A1 = diag(0.5, 0)): dL/dh1 =
    (3 (p0 - y0), 0) and F1 = (0.5 x0, 0). With x0 = +1 for class 0 (p0 - y0 < 0) and -1 for class
    1 (p0 - y0 > 0), F1 points along -dL/dh1 in every sample: cosine -1.
    """

    def __init__(self) -> None:
        super().__init__()
        self.block1 = LinearBlock([[0.5, 0.0], [0.0, 0.0]])
        self.block2 = LinearBlock([[0.0, 0.0], [0.0, 1.0]])
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(x)))


def test_a_branch_along_the_negative_gradient_has_cosine_minus_one():
    model = DownhillNet()
    model.head.weight.grad = torch.full((2, 2), 7.0)  # gradients the user holds stay as they were
    data = batched(torch.tensor([[1.0, 1.0], [-1.0, 1.0]]).repeat(3, 1), torch.tensor([0, 1]).repeat(3), 4)
    before = snapshot(model)
    table = refinement(model, data, progress=False).set_index("block")
    assert_unchanged(model, before)
    assert torch.equal(model.head.weight.grad, torch.full((2, 2), 7.0)) and model.block1.branch.weight.grad is None
    assert table["grad_cosine"].tolist() == pytest.approx([-1.0, 0.0], abs=1e-6)
    assert table["grad_cosine_std"].tolist() == pytest.approx([0.0, 0.0], abs=1e-3)
    # ||F1|| / ||x|| = 0.5 / sqrt(2); block2's input is (1.5 x0, 1): ||F2|| / ||h2|| = 1 / sqrt(1.5^2 + 1).
    assert table["step_ratio"].tolist() == pytest.approx([0.5 / math.sqrt(2), 1 / math.sqrt(3.25)])
    assert table["samples"].tolist() == [6, 6]


def test_refinement_of_projection_blocks_takes_the_block_input():
    torch.manual_seed(0)
    model = cifar_resnet(8, num_classes=3, in_channels=1).eval()
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    table = refinement(model, [(x, y)], progress=False).set_index("block")
    # By hand: h1 is the stem's output; the gradient at h1 through the rest of the network.
    stem = model.relu(model.bn1(model.conv1(x))).detach().requires_grad_(True)
    h2 = model.layer1(stem)
    logits = model.fc(torch.flatten(model.avgpool(model.layer3(model.layer2(h2))), 1))
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), stem)

    def branch(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return block.bn2(block.conv2(block.relu1(block.bn1(block.conv1(h)))))

    with torch.no_grad():
        f1 = branch(model.layer1[0], stem).flatten(1)
        cosine = F.cosine_similarity(f1, grad.flatten(1), dim=1).mean().item()
        f2 = branch(model.layer2[0], h2).flatten(1)  # (5, 32 * 4 * 4): h2 is (5, 16 * 8 * 8)
        ratio = (f2.norm(dim=1) / h2.flatten(1).norm(dim=1)).mean().item()
    assert table.loc["layer1.0", "grad_cosine"] == pytest.approx(cosine, abs=1e-5)
    assert np.isnan(table.loc["layer2.0", "grad_cosine"]) and np.isnan(table.loc["layer3.0", "grad_cosine"])
    assert table.loc["layer2.0", "step_ratio"] == pytest.approx(ratio, rel=1e-5)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("run", [
    lambda m, d: linear_probes(m, d, train_data=d, progress=False),
    lambda m, d: head_lens(m, d, progress=False),
    lambda m, d: refinement(m, d, progress=False),
    lambda m, d: cka(m, d, progress=False),
])
def test_the_model_is_left_as_found_when_a_probe_fails(tiny_net, run):
    tiny_net.train()
    before = snapshot(tiny_net)
    data = [(torch.ones(2, 2), torch.tensor([0, 1])), (torch.ones(2, 5), torch.tensor([0, 1]))]  # misfit second
    with pytest.raises(probe.ProbeError, match="cannot take inputs of shape"):
        run(tiny_net, data)
    assert_unchanged(tiny_net, before)
    assert tiny_net.training and all(p.grad is None for p in tiny_net.parameters())


# --- block by class and the summary ---------------------------------------------------------------


def synthetic_evaluation() -> tuple[pd.DataFrame, Evaluation]:
    """Two blocks, three classes of 4 samples each. Deleting a costs class 2 half its accuracy and
    class 0 a quarter; deleting b costs nothing but class 1 a quarter."""
    baseline = Outcome(accuracy=1.0, loss=0.1, samples=12, class_accuracy=[1.0, 1.0, 1.0], class_samples=[4, 4, 4])
    a = Outcome(accuracy=0.75, loss=0.5, samples=12, flip_rate=0.25, class_accuracy=[0.75, 1.0, 0.5],
                class_samples=[4, 4, 4])
    b = Outcome(accuracy=11 / 12, loss=0.2, samples=12, flip_rate=1 / 12, class_accuracy=[1.0, 0.75, 1.0],
                class_samples=[4, 4, 4])
    table = pd.DataFrame({"block": ["a", "b"], "position": [0, 1], "ratio": [0.9, 0.2],
                          "accuracy_drop": [0.25, 1 / 12], "verdict": ["helps", "skipped"]})
    return table, Evaluation(baseline, [a, b])


def test_block_classes_rank_the_classes_each_block_serves():
    table, evaluation = synthetic_evaluation()
    classes = block_classes(table, evaluation).set_index(["block", "class"])
    assert classes.loc[("a", 2), "accuracy_drop"] == 0.5 and classes.loc[("a", 2), "rank"] == 1
    assert classes.loc[("a", 0), "rank"] == 2 and classes.loc[("a", 1), "rank"] == 3
    assert classes.loc[("b", 1), "rank"] == 1 and classes.loc[("b", 0), "rank"] == 2  # ties: by class


def test_summary_joins_every_probe_per_block():
    table, evaluation = synthetic_evaluation()
    probes = pd.DataFrame({"block": ["a", "b"], "stage": [1, 1], "test_accuracy": [0.7, 0.8], "gain": [0.2, 0.1]})
    lens = pd.DataFrame({"block": ["a", "b"], "accuracy": [np.nan, 0.75]})
    steps = pd.DataFrame({"block": ["a", "b"], "grad_cosine": [np.nan, -0.2], "step_ratio": [1.0, 0.3]})
    similarity = pd.DataFrame({"block_a": ["a", "a", "b", "b"], "block_b": ["a", "b", "a", "b"],
                               "cka": [1.0, 0.6, 0.6, 1.0]})
    out = summary(table, probes, lens, steps, similarity, block_classes(table, evaluation)).set_index("block")
    assert out.loc["a", ["probe_accuracy", "probe_gain", "step_ratio", "cka_next"]].tolist() == [0.7, 0.2, 1.0, 0.6]
    assert np.isnan(out.loc["a", "cka_previous"]) and np.isnan(out.loc["b", "cka_next"])
    assert out.loc["b", "cka_previous"] == 0.6 and out.loc["b", "grad_cosine"] == -0.2
    assert out["top_class"].tolist() == [2, 1] and out["top_class_drop"].tolist() == [0.5, 0.25]
    assert out["verdict"].tolist() == ["helps", "skipped"] and not out["bn_recalibrated"].any()


def test_a_block_that_costs_no_class_serves_none_in_the_summary_as_in_the_heatmap():
    table, evaluation = synthetic_evaluation()
    free = Outcome(accuracy=1.0, loss=0.1, samples=12, flip_rate=0.0, class_accuracy=[1.0, 1.0, 1.0],
                   class_samples=[4, 4, 4])  # deleting b costs no class anything
    evaluation = Evaluation(evaluation.baseline, [evaluation.sets[0], free])
    table["accuracy_drop"] = [0.25, 0.0]
    classes = block_classes(table, evaluation)
    empty = pd.DataFrame({"block": [], "block_a": [], "block_b": [], "cka": []})
    out = summary(table, empty, empty, empty, empty, classes).set_index("block")
    assert out.loc["a", "top_class"] == 2 and out.loc["a", "top_class_drop"] == 0.5
    assert out.loc["b", "top_class"] is pd.NA and np.isnan(out.loc["b", "top_class_drop"])
    ax = figures.class_service_heatmap(classes)
    boxes = [p for p in ax.patches if isinstance(p, Rectangle) and not p.get_fill()]
    assert sorted((p.get_x(), p.get_y()) for p in boxes) == [(2, 0)]  # a: class 2; b: no box
    plt.close(ax.figure)


def test_representation_of_tiny_net_reuses_the_table_and_evaluation(tiny_net):
    train, test = separable()
    table, evaluation = synthetic_evaluation()
    table["block"] = ["block1", "block2"]
    before = snapshot(tiny_net)
    result = representation(tiny_net, test, train_data=train, table=table, evaluation=evaluation, progress=False)
    assert_unchanged(tiny_net, before)
    assert list(result.tables()) == ["linear_probes", "logit_lens", "refinement", "cka", "block_classes",
                                     "representation"]
    assert result.summary["probe_accuracy"].tolist() == [1.0, 1.0]
    assert result.summary["top_class"].tolist() == [2, 1]
    assert result.summary["cka_next"].iloc[0] == result.cka.set_index(["block_a", "block_b"]).loc[
        ("block1", "block2"), "cka"]
    lines = story(result)
    assert lines[0].startswith("Linear probes read 100.0% of the evaluation labels from the first block's input")
    assert "The 1 blocks the deletion rule calls skipped change probe accuracy by +0.0 points" in lines[1]


def test_representation_refuses_what_it_cannot_use(tiny_net):
    train, test = separable()
    with pytest.raises(probe.ProbeError, match="more than once"):
        representation(tiny_net, iter(test), train_data=train, progress=False)
    table, evaluation = synthetic_evaluation()
    with pytest.raises(probe.ProbeError, match="together with a precomputed evaluation"):
        representation(tiny_net, test, train_data=train, evaluation=evaluation, progress=False)
    no_classes = Evaluation(Outcome(accuracy=1.0, loss=0.1, samples=4), evaluation.sets)
    table["block"] = ["block1", "block2"]
    with pytest.raises(probe.ProbeError, match="per-class"):
        representation(tiny_net, test, train_data=train, table=table, evaluation=no_classes, progress=False)


def test_representation_computes_the_sweep_when_not_given(tiny_net):
    train, test = separable()
    result = representation(tiny_net, test, train_data=train, progress=False)
    sweep = probe.sweep(tiny_net, test, progress=False)
    assert result.summary["accuracy_drop"].tolist() == sweep["accuracy_drop"].tolist()
    assert set(result.classes["class"]) == {0, 1}


def test_story_says_when_the_numbers_do_not_tell_refinement():
    names, stage = ["a", "b", "c"], [1, 1, 2]
    probes = pd.DataFrame({"block": names, "stage": stage, "test_accuracy": [0.6, 0.7, 0.9],
                           "previous_test_accuracy": [0.5, 0.6, 0.7], "gain": [0.1, 0.1, 0.2]})
    lens = pd.DataFrame({"block": names, "applicable": [False] * 3, "accuracy": np.nan, "agreement": np.nan})
    overview = pd.DataFrame({"block": names, "stage": stage, "verdict": ["helps", "skipped", "helps"],
                             "probe_gain": [0.1, 0.1, 0.2], "grad_cosine": [0.2, 0.1, np.nan],
                             "step_ratio": [1.0, 0.5, 0.2], "cka_next": [0.5, 0.4, np.nan]})
    similarity = pd.DataFrame([{"position_a": i, "position_b": j, "stage_a": stage[i], "stage_b": stage[j],
                                "cka": 1.0 if i == j else 0.5 if {i, j} == {0, 1} else 0.4}
                               for i in range(3) for j in range(3)])
    result = RepresentationResult(probes=probes, lens=lens, refinement=pd.DataFrame(), cka=similarity,
                                  classes=pd.DataFrame(), summary=overview)
    lines = story(result)
    assert lines[0].startswith("Linear probes read 50.0% of the evaluation labels from the first block's input, "
                               "60.0% after the first block and 90.0% after the last")
    assert lines[1] == ("The 1 blocks the deletion rule calls skipped change probe accuracy by +10.0 points "
                        "together (from +10.0 to +10.0 each).")
    assert lines[2].startswith("cos(F(h), dL/dh) is negative at 0 of the 2 blocks where F(h) and h share a shape "
                               "(mean +0.150, from +0.100 to +0.200): most blocks do not move")
    assert lines[3] == ("Linear CKA between neighbouring blocks of one stage averages 0.50 (all pairs within a "
                        "stage: 0.50; pairs from different stages: 0.40).")
    # The net gain is 0.9 - 0.5; the first blocks of the stages (a, c) bring 0.1 + 0.2 of it.
    assert lines[4] == ("Together: not a clean iterative-refinement story (most branches do not point down the "
                        "loss; neighbouring blocks within a stage are not alike (CKA below 0.9)). Of the +40.0 "
                        "points the probes gain from the first block's input to the last block's output, +30.0 "
                        "come at the first block of a stage (a, c).")


# --- figures and the report section -------------------------------------------------------------


def summary_table() -> pd.DataFrame:
    return pd.DataFrame({"block": ["b", "a", "c"], "position": [1, 0, 2], "stage": [1, 1, 2],
                         "probe_accuracy": [0.9, 0.8, 0.95], "lens_accuracy": [np.nan, np.nan, 0.9],
                         "verdict": ["skipped", "helps", "helps"]})


def test_representation_accuracy_draws_probe_and_lens_in_forward_order():
    ax = figures.representation_accuracy(summary_table())
    probe_line, lens_line = ax.get_lines()[0], ax.get_lines()[1]
    np.testing.assert_allclose(probe_line.get_ydata(), [80, 90, 95])
    np.testing.assert_allclose(lens_line.get_ydata(), [np.nan, np.nan, 90])
    stage_lines = [line for line in ax.get_lines()[2:] if line.get_linestyle() == ":"]
    assert [line.get_xdata()[0] for line in stage_lines] == [1.5]  # between b (stage 1) and c (stage 2)


def test_refinement_profile_bars_and_step_line():
    df = pd.DataFrame({"block": ["a", "b"], "position": [0, 1], "stage": [1, 2], "grad_cosine": [-0.2, np.nan],
                       "grad_cosine_std": [0.1, np.nan], "step_ratio": [0.5, 0.25]})
    ax = figures.refinement_profile(df)
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [p.get_height() for p in bars.patches] == pytest.approx([-0.2, 0.0])
    assert [t.get_text() for t in ax.texts] == ["n/a"] and ax.texts[0].get_position()[0] == 1
    right = [other for other in ax.figure.axes if other is not ax and other.get_lines()][0]
    np.testing.assert_allclose(right.get_lines()[0].get_ydata(), [0.5, 0.25])
    assert ax.get_ylim()[0] == pytest.approx(1.15 * -0.3)  # the lowest error bar end, with room
    uphill = figures.refinement_profile(df.assign(grad_cosine=[0.6, np.nan]))
    assert uphill.get_ylim()[1] == pytest.approx(1.15 * 0.7)  # bars above zero stay in view


def test_cka_heatmap_values_and_stage_lines():
    rows = [("a", 0, 1), ("b", 1, 1), ("c", 2, 2)]
    values = {("a", "b"): 0.8, ("a", "c"): 0.3, ("b", "c"): 0.5}
    df = pd.DataFrame([{"block_a": a, "position_a": pa, "stage_a": sa, "block_b": b, "position_b": pb,
                        "stage_b": sb, "cka": 1.0 if a == b else values.get((a, b), values.get((b, a)))}
                       for a, pa, sa in rows for b, pb, sb in rows])
    ax = figures.cka_heatmap(df.sample(frac=1, random_state=0))  # row order must not matter
    grid = np.asarray(ax.collections[0].get_array()).reshape(3, 3)
    np.testing.assert_allclose(grid, [[1, 0.8, 0.3], [0.8, 1, 0.5], [0.3, 0.5, 1]])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    vertical = [line.get_xdata()[0] for line in ax.get_lines() if line.get_xdata()[0] == line.get_xdata()[1]]
    horizontal = [line.get_ydata()[0] for line in ax.get_lines() if line.get_ydata()[0] == line.get_ydata()[1]]
    assert vertical == horizontal == [2]  # cells span i..i+1: the line between b and c


def test_class_service_heatmap_boxes_the_top_class():
    table, evaluation = synthetic_evaluation()
    ax = figures.class_service_heatmap(block_classes(table, evaluation))
    boxes = [p for p in ax.patches if isinstance(p, Rectangle) and not p.get_fill()]
    assert sorted((p.get_x(), p.get_y()) for p in boxes) == [(1, 1), (2, 0)]  # a: class 2; b: class 1


def test_representation_section(tiny_net):
    train, test = separable()
    table, evaluation = synthetic_evaluation()
    table["block"] = ["block1", "block2"]
    result = representation(tiny_net, test, train_data=train, table=table, evaluation=evaluation, progress=False)
    result.lens.loc[0, ["applicable", "reason"]] = [False, "its output has 2 features; the head takes 3"]
    section = sections.representation_section(result, lines=["the story."])
    assert section.id == "representation" and "the story." in section.lead
    assert len(section.figures) == 4 and all(f.src.startswith("data:image/png;base64,") for f in section.figures)
    assert section.notes == ["The model's head cannot be applied to block1: its output has 2 features; the head "
                             "takes 3."]
    assert section.tables[0].headers[:4] == ["block", "stage", "ratio", "deletion cost (pp)"]
    assert [cell["text"] for cell in section.tables[0].rows[1]][4:6] == ["skipped", "100.00"]


# --- the command -------------------------------------------------------------------------------------


TABLES = ["linear_probes", "logit_lens", "refinement", "cka", "block_classes", "representation"]
PNGS = ["representation_accuracy", "refinement", "cka", "block_classes"]


def test_command_writes_tables_and_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.manual_seed(0)
    checkpoint = tmp_path / "resnet8.pt"
    save_checkpoint(cifar_resnet(8, num_classes=10, in_channels=1), checkpoint)
    out = tmp_path / "out"
    main = importlib.import_module("analyses.representation.__main__").main
    assert main(["--model", "resnet8", "--checkpoint", str(checkpoint), "--limit", "40", "--batch-size", "16",
                 "--out", str(out), "--no-progress"]) == 0
    for name in TABLES:
        assert len(pd.read_csv(out / f"{name}.csv")), name
    for name in PNGS:
        assert (out / f"{name}.png").read_bytes().startswith(b"\x89PNG"), name
    assert len(pd.read_csv(out / "cka.csv")) == 3 * 3
    probes = pd.read_csv(out / "linear_probes.csv")
    assert probes["train_samples"].tolist() == [40] * 3 and probes["test_samples"].tolist() == [40] * 3
    assert "Linear probes read" in capsys.readouterr().out
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m analyses.representation: error:")
