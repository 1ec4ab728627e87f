"""Tiny models and data sets for the task tests, importable by the CLI (`tests.task_models:...`).

- `TinyLM`: a causal language model with per-position residual blocks (so padding cannot leak
  into real positions), taking `input_ids` and `attention_mask` as keywords.
- `TwoHeads` (`task_fixtures.TwoHeadNet`): a backbone of residual blocks with two heads at two
  depths (a list of outputs), one block's branch exactly zero; `two_heads_by_hand` writes it out.
- `Regressor`: one output per sample, for a user's own loss.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset

from task_fixtures import Block, unlabelled_images  # noqa: F401  (re-exported for the CLI)
from task_fixtures import TwoHeadNet as TwoHeads

VOCAB = 11


class Residual(nn.Module):
    """x + W x + b, per position."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.f = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class TinyLM(nn.Module):
    def __init__(self, layers: int = 3, width: int = 6, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, width)
        self.layers = nn.Sequential(*[Residual(width) for _ in range(layers)])
        self.head = nn.Linear(width, VOCAB)
        with torch.no_grad():  # branches of a realistic size: deleting one matters, but not wildly
            for layer in self.layers:
                layer.f.weight.mul_(0.5)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.layers(self.embed(input_ids)))  # (batch, seq, vocab)


def tiny_lm() -> TinyLM:
    return TinyLM()


def lm_logits_by_hand(model: TinyLM, ids: torch.Tensor, skip: set[int] = frozenset()) -> torch.Tensor:
    """TinyLM's forward written out with its weights, leaving out the layers in `skip`."""
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


def two_heads() -> TwoHeads:
    return TwoHeads()


def two_heads_by_hand(model: TwoHeads, x: torch.Tensor, skip: set[str] = frozenset()) -> list[torch.Tensor]:
    """TwoHeads written out with functional convolutions, the blocks in `skip` passing x through."""

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


class Classifier(nn.Module):
    """Two residual conv blocks and a linear head over 3 classes, on 1 x 8 x 8 images."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block0, self.block1 = Block(4), Block(4)
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
