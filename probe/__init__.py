"""probe: what each residual block of a trained network learned.

    blocks = probe.find_blocks(model)        # residual blocks, in forward order
    stats  = probe.measure(model, data)      # branch vs shortcut statistics, one row per block
    result = probe.sweep(model, data)        # what deleting each block alone costs
    table  = probe.block_table(model, data)  # both, joined, with a verdict per block
    probe.sweep(lm, text, task="lm")         # any task: "classification", "lm", "drift", your function
    with probe.ablated(model, ["layer2.0"]):
        logits = model(x)                    # with that block's branch removed

The layers of the code and what each may import: docs/architecture.md.
"""

from probe.deletion.ablated import ablated
from probe.batches import Data
from probe.discovery.find import Block, find_blocks
from probe.instrument.describe import describe_blocks
from probe.errors import ProbeError
from probe.deletion.evaluation import FastPathNote, evaluate_ablations, fast_path_note, sweep
from probe.instrument.measurement import branch_means, measure
from probe.scoring.results import Evaluation, Outcome
from probe.discovery.spec import BlockSpec, parse_spec
from probe.deletion.block_table import block_table, join_block_table
from probe.scoring.tasks import Classification, CustomTask, Drift, LanguageModeling, Task
from probe.scoring.verdict import VerdictRule

__all__ = ["Block", "BlockSpec", "Classification", "CustomTask", "Data", "Drift", "Evaluation", "FastPathNote",
           "LanguageModeling",
           "Outcome", "ProbeError", "Task", "VerdictRule", "ablated", "block_table",
           "branch_means", "describe_blocks", "evaluate_ablations", "fast_path_note", "find_blocks", "join_block_table", "measure",
           "parse_spec", "sweep"]
__version__ = "0.1.0"
