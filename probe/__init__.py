"""probe: what each residual block of a trained network learned.

    blocks = probe.find_blocks(model)        # residual blocks, in forward order
    stats  = probe.measure(model, data)      # branch vs shortcut statistics, one row per block
    result = probe.sweep(model, data)        # what deleting each block alone costs
    table  = probe.block_table(model, data)  # both, joined, with a verdict per block
    probe.sweep(lm, text, task="lm")         # any task: "classification", "lm", "drift", "detection", yours
    with probe.ablated(model, ["layer2.0"]):
        logits = model(x)                    # with that block's branch removed

The layers of the code and what each may import: docs/architecture.md.
"""

import importlib

# Where each public name lives. They are imported when first used (PEP 562), so that
# `python -m probe.ablate --help` and a command's one-line errors do not wait for the analysis
# stack; `from probe import sweep` and `probe.sweep` work as with eager imports.
_PUBLIC = {
    "ablated": "probe.deletion.ablated",
    "Data": "probe.batches",
    "Block": "probe.discovery.find", "find_blocks": "probe.discovery.find",
    "describe_blocks": "probe.instrument.describe",
    "ProbeError": "probe.errors",
    "FastPathNote": "probe.deletion.evaluation", "evaluate_ablations": "probe.deletion.evaluation",
    "fast_path_note": "probe.deletion.evaluation", "sweep": "probe.deletion.evaluation",
    "branch_means": "probe.instrument.measurement", "measure": "probe.instrument.measurement",
    "Evaluation": "probe.scoring.results", "Outcome": "probe.scoring.results",
    "BlockSpec": "probe.discovery.spec", "parse_spec": "probe.discovery.spec",
    "block_table": "probe.deletion.block_table", "join_block_table": "probe.deletion.block_table",
    "Classification": "probe.scoring.tasks", "CustomTask": "probe.scoring.tasks", "Drift": "probe.scoring.tasks",
    "LanguageModeling": "probe.scoring.tasks", "Task": "probe.scoring.tasks",
    "Detection": "probe.scoring.detection",
    "VerdictRule": "probe.scoring.verdict",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> object:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'probe' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # found once; later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


__version__ = "0.1.0"
