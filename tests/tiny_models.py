"""Every tiny model the tests share, with its data and its forward written out by hand.

Importable by the tests by bare name (pytest's `pythonpath` holds tests/) and by the CLI in a
test's subprocess (`--model tiny_models:two_head_model --dataset tiny_models:unlabelled_images`,
with tests/ on PYTHONPATH).

- What a probe call must leave unchanged: `snapshot`, `assert_unchanged`.
- `TinyNet`: two 2-d blocks set by hand (`TinyBlock`; `LinearBlock` without the ReLU), and its
  three samples `TINY_X`, `TINY_Y` (`tiny_data` in batches).
- `BNNet`: one block whose branch ends in BatchNorm, then BatchNorm and a head; buffers set by
  hand; calibration batches `BN_CAL`, evaluation samples `BN_EVAL_X`, `BN_EVAL_Y` (`BN_EVAL`).
- Two causal language models, per-position `Residual` blocks (padding cannot leak into real
  positions), taking `input_ids` and `attention_mask`:
  `StackedLM` (its layers an `nn.Sequential` like a decoder's: `layers.0`-`layers.2`, vocabulary
  11, width 6; `stacked_lm_logits_by_hand`), with `TokenWindows` of `SEQUENCES`;
  `TwoBlockLM` (two named blocks `l0`, `l1`, vocabulary 5, width 3; `two_block_lm_logits_by_hand`).
- `TwoHeadNet`: a backbone of `ConvBlock`s with two heads at two depths (a list of outputs, no
  logits), one block's branch exactly zero, on `unlabelled_images`; `two_heads_by_hand`.
- `Regressor`: one output per sample, for a user's own loss (`squared_error`).
- `Classifier` on `labelled_images`, and the forms a user's model and data may take: `Forms`
  (logits wrapped), `TwoInputs`, `NamedItems`, `images_with_extras`, `two_input_images`.
- Small models of the families test (`GeluEnd`, `ScaledEnd`: branches ending in a function or a
  scale): `FunctionalEnds`, `Untraceable` (torch.fx cannot trace it), `tiny_vit`; `randomize`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset

from probe.loading.checkpoints import save_checkpoint
from probe.loading.models import cifar_resnet

# -- what a probe call must leave unchanged --------------------------------------------------------


def snapshot(model: nn.Module) -> dict:
    """Everything a probe call must leave unchanged."""
    hook_dicts = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                  "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
                  "_load_state_dict_pre_hooks")
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": {name: m.training for name, m in model.named_modules()},
        "hooks": {name: {d: len(getattr(m, d, {})) for d in hook_dicts} for name, m in model.named_modules()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["grad"] == before["grad"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(value, after["tensors"][key]), key


# -- TinyNet: two hand-set blocks over 2-d inputs --------------------------------------------------


class TinyBlock(nn.Module):
    """out = relu(x + branch(x)), with a bias-free linear branch set by hand."""

    def __init__(self, weight: list[list[float]]) -> None:
        super().__init__()
        self.branch = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.branch.weight.copy_(torch.tensor(weight))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.branch(x))


class LinearBlock(nn.Module):
    """out = x + A x (no activation), A set by hand."""

    def __init__(self, weight: list[list[float]]) -> None:
        super().__init__()
        self.branch = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.branch.weight.copy_(torch.tensor(weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class TinyNet(nn.Module):
    """Two hand-set residual blocks and a linear head over 2 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = TinyBlock([[1.0, 0.0], [0.0, 0.0]])   # F(x) = (x0, 0)
        self.block2 = TinyBlock([[0.0, 0.0], [0.0, -0.5]])  # F(x) = (0, -x1 / 2)
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(x)))


# TinyNet's three samples: (3, 2) inputs and their classes.
TINY_X = torch.tensor([[3.0, 4.0], [1.0, 1.0], [0.3, 1.0]])
TINY_Y = torch.tensor([0, 1, 1])


def tiny_data(batch_size: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """TINY_X and TINY_Y in batches of `batch_size` (the last one shorter)."""
    return [(TINY_X[i:i + batch_size], TINY_Y[i:i + batch_size]) for i in range(0, len(TINY_X), batch_size)]


# -- BNNet: BatchNorm in a branch and after it, buffers set by hand -----------------------------------


class BNBlock(nn.Module):
    """out = relu(x + BN(W x)): the branch ends in its own BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2))
        with torch.no_grad():
            self.branch[0].weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 0.5]]))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.branch(x))


class BNNet(nn.Module):
    """block -> BatchNorm1d -> linear head over 2 classes; BN buffers set away from their defaults."""

    def __init__(self) -> None:
        super().__init__()
        self.block = BNBlock()
        self.norm = nn.BatchNorm1d(2)
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
            self.head.bias.zero_()
            for bn, mean, var in ((self.block.branch[1], [0.5, -0.5], [2.0, 3.0]), (self.norm, [1.0, 0.2], [0.5, 4.0])):
                bn.running_mean.copy_(torch.tensor(mean))
                bn.running_var.copy_(torch.tensor(var))
                bn.num_batches_tracked.fill_(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block(x)))


# BNNet's data: 8 calibration samples in two batches of 4, 10 evaluation samples in batches of 6 and 4.
_BN_GENERATOR = torch.Generator().manual_seed(3)
BN_CAL_X = torch.randn(8, 2, generator=_BN_GENERATOR)
BN_CAL = [(BN_CAL_X[:4], torch.zeros(4, dtype=torch.long)), (BN_CAL_X[4:], torch.zeros(4, dtype=torch.long))]
BN_EVAL_X = torch.randn(10, 2, generator=_BN_GENERATOR)
BN_EVAL_Y = torch.tensor([0, 1] * 5)
BN_EVAL = [(BN_EVAL_X[:6], BN_EVAL_Y[:6]), (BN_EVAL_X[6:], BN_EVAL_Y[6:])]


# -- causal language models ---------------------------------------------------------------------------


class Residual(nn.Module):
    """x + W x + b, per position."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.f = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


STACKED_LM_VOCAB = 11


class StackedLM(nn.Module):
    """Embedding, `layers` residual blocks in an nn.Sequential (`layers.0`, ...), a head over 11 tokens."""

    def __init__(self, layers: int = 3, width: int = 6, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(STACKED_LM_VOCAB, width)
        self.layers = nn.Sequential(*[Residual(width) for _ in range(layers)])
        self.head = nn.Linear(width, STACKED_LM_VOCAB)
        with torch.no_grad():  # branches of a realistic size: deleting one matters, but not wildly
            for layer in self.layers:
                layer.f.weight.mul_(0.5)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.layers(self.embed(input_ids)))  # (batch, seq, vocab)


def stacked_lm() -> StackedLM:
    return StackedLM()


def stacked_lm_logits_by_hand(model: StackedLM, ids: torch.Tensor, skip: set[int] = frozenset()) -> torch.Tensor:
    """StackedLM's forward written out with its weights, leaving out the layers in `skip`."""
    h = model.embed.weight[ids]
    for index, layer in enumerate(model.layers):
        if index not in skip:
            h = h + h @ layer.f.weight.T + layer.f.bias
    return h @ model.head.weight.T + model.head.bias


class TokenWindows(Dataset):
    """Dict items {"input_ids", "attention_mask"} of token ids, right-padded with 0 to length 6."""

    def __init__(self, sequences: list[list[int]], length: int = 6) -> None:
        self.items = []
        for tokens in sequences:
            ids = torch.zeros(length, dtype=torch.long)
            ids[:len(tokens)] = torch.tensor(tokens)
            mask = torch.zeros(length, dtype=torch.long)
            mask[:len(tokens)] = 1
            self.items.append({"input_ids": ids, "attention_mask": mask})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


SEQUENCES = [[3, 1, 4, 1, 5, 9], [2, 6, 5], [3, 5, 8, 9], [7, 9, 3, 2, 3], [8, 4]]


def token_windows(split: str = "test") -> TokenWindows:
    return TokenWindows(SEQUENCES if split == "test" else SEQUENCES[::-1])


class TwoBlockLM(nn.Module):
    """Embedding, two residual blocks `l0` and `l1` per position, a head over a vocabulary of 5."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(5, 3)
        self.l0, self.l1 = Residual(3), Residual(3)
        self.head = nn.Linear(3, 5)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.l1(self.l0(self.embed(input_ids))))


def two_block_lm_logits_by_hand(model: TwoBlockLM, ids: torch.Tensor, skip: set[str] = frozenset()) -> torch.Tensor:
    """TwoBlockLM's forward written out with its weights, leaving out the blocks named in `skip`."""
    h = model.embed.weight[ids]
    for name in ("l0", "l1"):
        if name not in skip:
            layer = getattr(model, name).f
            h = h + h @ layer.weight.T + layer.bias
    return h @ model.head.weight.T + model.head.bias


# -- TwoHeadNet: two outputs, no logits, no labels: only the drift task applies ------------------------


class ConvBlock(nn.Module):
    """relu(x + conv(x)), or relu(x + bn(conv(x)))."""

    def __init__(self, channels: int, batchnorm: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        # No nn.Identity in its place: the branch is then the convolution's output, found alike
        # by a torch.fx trace and by a recorded forward (an Identity runs no torch function).
        self.bn = nn.BatchNorm2d(channels) if batchnorm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.conv(x)
        return F.relu(x + (self.bn(branch) if self.bn is not None else branch))


class TwoHeadNet(nn.Module):
    """stem -> block0 -> block1 -> head_a; -> down -> block2 -> head_b: [a, b], on 1 x 8 x 8 images.

    `block1`'s branch is exactly zero, so deleting it changes nothing: its drift is exactly 0.
    With `batchnorm`, the branches of block0 and block2 end in BatchNorm (for recalibration).
    """

    def __init__(self, seed: int = 0, batchnorm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block0, self.block1, self.block2 = ConvBlock(4, batchnorm), ConvBlock(4), ConvBlock(4, batchnorm)
        self.head_a = nn.Conv2d(4, 3, 1)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.head_b = nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.block1.conv.weight.zero_()
            self.block1.conv.bias.zero_()
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):  # statistics that recalibration changes
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.block1(self.block0(F.relu(self.stem(x))))
        return [self.head_a(h), self.head_b(self.block2(F.relu(self.down(h))))]


def two_head_model(seed: int = 0) -> TwoHeadNet:
    return TwoHeadNet(seed).eval()


def two_head_batchnorm_model(seed: int = 0) -> TwoHeadNet:
    return TwoHeadNet(seed, batchnorm=True).eval()


def unlabelled_images(split: str = "test") -> TensorDataset:
    """Images only (no targets): 12 of them for "test", another 12 for "train"."""
    generator = torch.Generator().manual_seed(0 if split == "test" else 1)
    return TensorDataset(torch.randn(12, 1, 8, 8, generator=generator))


def two_heads_by_hand(model: TwoHeadNet, x: torch.Tensor, skip: set[str] = frozenset()) -> list[torch.Tensor]:
    """TwoHeadNet (without BatchNorm) written out with functional convolutions, the blocks in
    `skip` passing x through."""

    def block(name: str, h: torch.Tensor) -> torch.Tensor:
        conv = getattr(model, name).conv
        branch = torch.zeros_like(h) if name in skip else F.conv2d(h, conv.weight, conv.bias, padding=1)
        return torch.relu(h + branch)

    h = torch.relu(F.conv2d(x, model.stem.weight, model.stem.bias, padding=1))
    h = block("block1", block("block0", h))
    a = F.conv2d(h, model.head_a.weight, model.head_a.bias)
    g = torch.relu(F.conv2d(h, model.down.weight, model.down.bias, stride=2, padding=1))
    b = F.conv2d(block("block2", g), model.head_b.weight, model.head_b.bias)
    return [a, b]


# -- Regressor: a user's own loss ----------------------------------------------------------------------


class Regressor(nn.Module):
    """A residual MLP with one output per sample."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(3, 5)
        self.block0, self.block1 = Residual(5), Residual(5)
        self.out = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block1(self.block0(self.inp(x)))).squeeze(1)


def regressor() -> Regressor:
    return Regressor()


def regression_data(split: str = "test") -> TensorDataset:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(20, 3, generator=generator)
    return TensorDataset(x, x.sum(dim=1) * 0.1)


def squared_error(outputs: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """A user's task: per-sample squared error, correct within 0.5."""
    error = outputs - batch[1]
    return error.square(), error.abs() < 0.5


# -- Classifier, and the forms a user's model and data take -------------------------------------------


class Classifier(nn.Module):
    """Two residual conv blocks and a linear head over 3 classes, on 1 x 8 x 8 images."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block0, self.block1 = ConvBlock(4), ConvBlock(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block1(self.block0(F.relu(self.stem(x)))).mean(dim=(2, 3)))


def classifier() -> Classifier:
    return Classifier()


def labelled_images(split: str = "test") -> TensorDataset:
    generator = torch.Generator().manual_seed(3 if split == "test" else 4)
    return TensorDataset(torch.randn(24, 1, 8, 8, generator=generator), torch.randint(0, 3, (24,), generator=generator))


class NamedItems(Dataset):
    """labelled_images as dict items {"pix", "lab"}: keys probe cannot guess."""

    def __init__(self, split: str = "test") -> None:
        self.images = labelled_images(split)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image, label = self.images[index]
        return {"pix": image, "lab": label}


def named_items(split: str = "test") -> NamedItems:
    return NamedItems(split)


class Output:
    """A Hugging Face-like output: fields, logits among them."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self.hidden = logits * 2


class Forms(nn.Module):
    """The classifier with its logits wrapped as `kind` says."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.inner = Classifier()

    def forward(self, x):
        logits = self.inner(x)
        return {"tensor": lambda: logits, "tuple": lambda: (logits, x.mean()),
                "dict": lambda: {"logits": logits, "pooled": x.mean(dim=(1, 2, 3))},
                "object": lambda: Output(logits), "list": lambda: [logits, x]}[self.kind]()


def forms_tuple() -> Forms:
    return Forms("tuple")


def forms_dict() -> Forms:
    return Forms("dict")


def forms_object() -> Forms:
    return Forms("object")


# A second input, subtracted from the images: `model(images, shift)`.
SHIFT = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Classifier()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.inner(a - b)


def two_inputs() -> TwoInputs:
    return TwoInputs()


class _Reshaped(Dataset):
    """labelled_images with each item made by `shape(image, label, index)`."""

    def __init__(self, shape, split: str) -> None:
        self.images, self.shape = labelled_images(split), shape

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.shape(*self.images[index], index)


def images_with_extras(split: str = "test") -> Dataset:
    """(image, label, index, note) items: extras after the targets."""
    return _Reshaped(lambda image, label, index: (image, label, index, "note"), split)


def two_input_images(split: str = "test") -> Dataset:
    """((image, shift), label) items, for `TwoInputs`."""
    return _Reshaped(lambda image, label, index: ((image, SHIFT[0]), label), split)


# -- small models of the families test: branches that end in a function or a scale --------------------


class GeluEnd(nn.Module):
    """The branch ends in a function: x + gelu(fc(x))."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + F.gelu(self.fc(x))


class ScaledEnd(nn.Module):
    """The branch ends in a learned scale (LayerScale, ReZero): x + gamma * f(x)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
        self.gamma = nn.Parameter(torch.full((width,), 0.5))

    def forward(self, x):
        return x + self.gamma * self.f(x)


class FunctionalEnds(nn.Module):
    def __init__(self, width: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(12, width)
        self.blocks = nn.Sequential(GeluEnd(width), ScaledEnd(width), GeluEnd(width))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x.flatten(1))))


class Untraceable(nn.Module):
    """Python control flow on tensor values: torch.fx cannot trace it, a forward pass can."""

    def __init__(self, width: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(12, width)
        self.blocks = nn.Sequential(ScaledEnd(width), GeluEnd(width))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x.flatten(1))
        if bool(x.abs().sum() >= 0):  # always true, but only a real tensor can say so
            x = self.blocks(x)
        return self.head(x)


def tiny_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=3)


def randomize(model: nn.Module, input_shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """Random weights with some spread (zero-initialised heads too), and BatchNorm statistics
    taken from random data with some offset, so activations neither vanish nor saturate."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if norms:
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None  # cumulative average: the statistics of this one batch
            model.train()(0.5 + torch.randn(8, *input_shape[1:]))
            for norm in norms:
                norm.momentum = 0.1
    return model.eval()


def saved_cifar_resnet(folder, depth: int = 8, num_classes: int = 10, in_channels: int = 1):
    """A seeded CIFAR-style ResNet-`depth` (random weights) saved as `folder/resnet<depth>.pt`, the
    checkpoint the command-line tests run on; its path."""
    torch.manual_seed(0)
    path = folder / f"resnet{depth}-{num_classes}x{in_channels}.pt"
    save_checkpoint(cifar_resnet(depth, num_classes=num_classes, in_channels=in_channels), path)
    return path


def tiny_llama(layers: int = 3) -> nn.Module:
    """A random Llama of `layers` decoder layers (attention and MLP: two blocks each) over 50 tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    model.config.use_cache = False
    return model.eval()
