"""probe: what each residual block of a trained network learned.

    blocks = probe.find_blocks(model)    # residual blocks, in forward order
    stats  = probe.measure(model, data)  # branch vs shortcut statistics, one row per block
    result = probe.sweep(model, data)    # what deleting each block alone costs
    with probe.ablated(model, ["layer2.0"]):
        logits = model(x)                # with that block's branch removed
"""

from probe.ablation import ablated
from probe.blocks import Block, find_blocks
from probe.describe import describe_blocks
from probe.errors import ProbeError
from probe.measure import branch_means, measure
from probe.spec import BlockSpec, parse_spec
from probe.sweep import evaluate_ablations, sweep

__all__ = ["Block", "BlockSpec", "ProbeError", "ablated", "branch_means", "describe_blocks", "evaluate_ablations",
           "find_blocks", "measure", "parse_spec", "sweep"]
__version__ = "0.1.0"
