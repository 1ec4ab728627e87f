"""Property: on random residual networks, discovery finds exactly the blocks that were built,
and measure's ratio is ||F(x)|| / ||s(x)|| of the built branches and shortcuts.

The networks vary in depth, widths, identity or projection shortcuts, pre- or post-activation,
how the branch ends (a module, a function, a learned scale), the order of the addition's
operands, in-place additions, and whether torch.fx can trace them at all (if not, discovery
runs one forward on an example input).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import probe


@dataclass(frozen=True)
class Design:
    cin: int
    cout: int
    projection: bool     # always True when cin != cout
    pre_activation: bool  # He et al. 2016: norm and activation before both paths, nothing after the sum
    end: str             # "module": F = f(h); "gelu": F = gelu(f(h)); "scale": F = gamma * f(h)
    branch_first: bool   # F + s, or s + F
    in_place: bool       # F += s (only with branch_first)


class RandomBlock(nn.Module):
    def __init__(self, design: Design) -> None:
        super().__init__()
        self.design = design
        self.norm = nn.LayerNorm(design.cin) if design.pre_activation else None
        self.f = nn.Sequential(nn.Linear(design.cin, design.cout), nn.ReLU(), nn.Linear(design.cout, design.cout))
        self.proj = nn.Linear(design.cin, design.cout, bias=False) if design.projection else None
        self.gamma = nn.Parameter(torch.rand(design.cout) + 0.5) if design.end == "scale" else None

    def branch_and_shortcut(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """F(x) and s(x), computed from the submodules: what the block adds."""
        h = F.leaky_relu(self.norm(x), 0.1) if self.norm is not None else x
        branch = self.f(h)
        if self.design.end == "gelu":
            branch = F.gelu(branch)
        elif self.design.end == "scale":
            branch = self.gamma * branch
        shortcut = self.proj(h) if self.proj is not None else x
        return branch, shortcut

    def forward(self, x):
        branch, shortcut = self.branch_and_shortcut(x)
        if self.design.in_place:
            branch += shortcut
            out = branch
        else:
            out = branch + shortcut if self.design.branch_first else shortcut + branch
        # Leaky: a relu could zero a whole narrow sample, and ||s(x)|| = 0 has no ratio.
        return out if self.design.pre_activation else F.leaky_relu(out, 0.1)


class RandomNet(nn.Module):
    def __init__(self, designs: list[Design], traceable: bool, classes: int = 3) -> None:
        super().__init__()
        self.traceable = traceable
        self.blocks = nn.Sequential(*[RandomBlock(d) for d in designs])
        self.head = nn.Linear(designs[-1].cout, classes)

    def forward(self, x):
        if not self.traceable and bool(x.isnan().any()):  # data-dependent: torch.fx cannot trace it
            return self.head(torch.zeros(len(x), self.head.in_features))
        return self.head(self.blocks(x))


@st.composite
def designs(draw) -> list[Design]:
    depth = draw(st.integers(1, 4))
    width = draw(st.integers(2, 5))
    built = []
    for _ in range(depth):
        cout = draw(st.integers(2, 5))
        projection = cout != width or draw(st.booleans())
        branch_first = draw(st.booleans())
        built.append(Design(width, cout, projection, draw(st.booleans()), draw(st.sampled_from(["module", "gelu", "scale"])),
                            branch_first, branch_first and draw(st.booleans())))
        width = cout
    return built


def expected_blocks(designs: list[Design]) -> list[tuple]:
    rows = []
    for i, d in enumerate(designs):
        name = f"blocks.{i}"
        branch = {"module": f"{name}.f", "gelu": f"gelu({name}.f)", "scale": f"mul({name}.gamma, {name}.f)"}[d.end]
        strategy = "hooks" if d.end == "module" else "intercept"
        rows.append((name, branch, f"{name}.proj" if d.projection else None, strategy, 0, 0 if d.branch_first else 1))
    return rows


@settings(max_examples=12, deadline=None)
@given(designs(), st.booleans(), st.integers(0, 2**16))
def test_discovery_finds_exactly_the_built_blocks_and_measures_them(designs, traceable, seed):
    torch.manual_seed(seed)
    model = RandomNet(designs, traceable).eval()
    x = torch.randn(4, designs[0].cin)
    blocks = probe.find_blocks(model, example_input=x[:1])
    assert [(b.name, b.branch, b.shortcut, b.strategy, b.add_index, b.branch_operand) for b in blocks] == \
           expected_blocks(designs)

    # ||F|| / ||s|| and cos(F, s) per sample, from the built modules, block by block.
    ratios, cosines, h = [], [], x
    with torch.no_grad():
        for block in model.blocks:
            branch, shortcut = block.branch_and_shortcut(h)
            ratios.append((branch.norm(dim=1) / shortcut.norm(dim=1)).mean().item())
            cosines.append(F.cosine_similarity(branch, shortcut, dim=1).mean().item())
            h = block(h)
    table = probe.measure(model, [(x[:3], torch.zeros(3, dtype=torch.long)), (x[3:], torch.zeros(1, dtype=torch.long))],
                          blocks=blocks, progress=False)
    assert list(table["block"]) == [b.name for b in blocks]
    assert table["ratio"].tolist() == [pytest.approx(r, rel=1e-5) for r in ratios]
    assert table["cosine"].tolist() == [pytest.approx(c, rel=1e-4, abs=1e-6) for c in cosines]

    # Zero-ablating the last block: its output is s(x) (activated, for post-activation blocks).
    last = model.blocks[-1]
    with torch.no_grad():
        h = x
        for block in model.blocks[:-1]:
            h = block(h)
        _, shortcut = last.branch_and_shortcut(h)
        expected = model.head(shortcut if last.design.pre_activation else F.leaky_relu(shortcut, 0.1))
        with probe.ablated(model, [blocks[-1]]):
            assert torch.allclose(model(x), expected, atol=1e-6)
