"""The vocabulary of a block's cost: one record per cost column, read by everything that shows one.

What deleting a block costs depends on the task (`probe.scoring.tasks.Task.cost`): the accuracy
drop for classification, the loss increase for a language model or a user's loss, the share of
a detector's detections lost, the drift of the outputs without labels. The verdict rule, the terminal summary, the figures and the HTML
report all word, scale and format a cost from its `Cost` here, so the cost of a new task is
described once.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ACCURACY_DROP", "COSTS", "Cost", "DETECTIONS_LOST", "DRIFT", "LOSS_INCREASE", "cost_named"]


@dataclass(frozen=True)
class Cost:
    """One cost column and how it is shown.

    column: the table's column; se_column: the column of its standard error (continuous costs;
    None for accuracy_drop, whose noise comes from the flip rate); name: the cost in a few
    words; long_name: in a sentence; helping: what deleting a block that helps does (the
    terminal's list); header, spec: its column's header and cell format in the report's tables
    (`reports.sections.common.format_cell`); scale: column value -> shown number (100 for
    points and %); axis_name, axis_unit, short_unit: a figure's axis; noise_spec, noise_header:
    the noise band's cell format and header; effect, short: the answer's words for one block's
    cost, format strings of the formatted number (`{unit}`: " nats per token" for a language
    model, else empty); signed: the cost has a direction (drift has none: it is a size).
    """

    column: str
    se_column: str | None
    name: str
    long_name: str
    helping: str
    header: str
    spec: str
    scale: float
    axis_name: str
    axis_unit: str
    short_unit: str
    noise_spec: str
    noise_header: str
    effect: str
    short: str
    signed: bool = True


ACCURACY_DROP = Cost(
    column="accuracy_drop", se_column=None, name="accuracy drop", long_name="accuracy drop",
    helping="costs the most accuracy", header="accuracy drop (pp)", spec="pp", scale=100.0,
    axis_name="accuracy drop", axis_unit="percentage points", short_unit="points",
    noise_spec="pm", noise_header="noise (pp)", effect="costs {} points of accuracy", short="{} points")
LOSS_INCREASE = Cost(
    column="loss_increase", se_column="loss_increase_se", name="loss increase", long_name="loss increase",
    helping="raises the loss the most", header="loss increase", spec="+.4f", scale=1.0,
    axis_name="loss increase", axis_unit="the task's loss", short_unit="the task's loss",
    noise_spec="pm.4f", noise_header="noise", effect="changes the loss by {}{unit}", short="loss {}")
DETECTIONS_LOST = Cost(
    column="detections_lost", se_column="detections_lost_se", name="detections lost",
    long_name="share of the reference's detections lost", helping="loses the most detections",
    header="detections lost (%)", spec="pct", scale=100.0, axis_name="detections lost",
    axis_unit="% of the reference's detections", short_unit="%", noise_spec="pm", noise_header="noise (%)",
    effect="loses {}% of the detections", short="{}% of detections lost")
DRIFT = Cost(
    column="drift", se_column="drift_se", name="drift", long_name="drift of the outputs",
    helping="moves the outputs the most", header="drift (%)", spec="pct", scale=100.0,
    axis_name="output drift", axis_unit="% of the outputs' size", short_unit="%",
    noise_spec="pm", noise_header="noise (%)", effect="moves the outputs by {}% of their size", short="drift {}%",
    signed=False)

# Every cost, by column, in the order a table that has several is read for one (`reports.figures.cost_of`).
COSTS: dict[str, Cost] = {cost.column: cost for cost in (ACCURACY_DROP, LOSS_INCREASE, DETECTIONS_LOST, DRIFT)}


def cost_named(column: str) -> Cost:
    """The `Cost` of a cost column; accuracy_drop's for a column that is no cost."""
    return COSTS.get(column, ACCURACY_DROP)
