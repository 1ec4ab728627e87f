"""The layer-pruning literature's questions, asked of a causal language model's layers and sublayers.

    python -m analyses.lm --model hf:PATH --out runs/lm

A decoder layer adds two branches to the residual stream (attention, then the MLP: two of probe's
blocks, `model.layers.3[self_attn]` and `model.layers.3[mlp]`); a layer is deleted by deleting
both (`probe.discovery.layers.group_layers`). Papers that prune whole layers ask:

1. **Block influence** (ShortGPT, Men et al. 2024): BI = 1 - cos(h_in, h_out), the cosine between
   the residual stream entering and leaving a layer, per token over the hidden dimension,
   averaged over every real token (attention mask 1) of every sequence. Low BI: the layer barely
   turns the stream, and ShortGPT deletes it. The same per sublayer (its shortcut s(x) against
   s(x) + F(x)), and the angular distance arccos(cos) / pi next to it.
2. **Spans** (Gromov et al. 2024, "The unreasonable ineffectiveness of the deeper layers"): for
   each span length n, the angular distance between the stream entering layer l and the stream
   entering layer l + n (the last layer's output for l + n = L), for every l; their pick is the
   span with the smallest distance. Deleting it is compared with the best span of that length by
   the measured loss (every span evaluated).
3. **Greedy deletion** (SLEB, Song et al. 2024): delete the layer whose removal, together with
   those already removed, gives the lowest loss; re-score every remaining layer after each
   removal. Compared with two one-shot orders: by the single-layer loss increase, and by block
   influence (lowest first), as perplexity curves over the k layers deleted.
4. **Cheap scores against the measured loss**: Spearman's rank correlation of block influence,
   single-layer angular distance (and the per-block ratio ||F(x)|| / ||s(x)|| of a per-block
   table) with the measured loss increase of deleting the layer (or sublayer) alone, with a
   seeded bootstrap interval over the layers.
5. **Logit lens** (nostalgebraist 2020): the model's final norm and unembedding applied to the
   residual stream after each layer: the next-token loss it would give, and how often its top-1
   token is the model's own final prediction.
6. **The finding** (`depth_finding`): do the deep layers other than the last have lower block
   influence, and cost less to delete, than the early ones? One sentence, with the numbers.

Deleting means mode "zero" (a branch's output replaced by zeros: the layer passes its input on).
Every loss is the `lm` task's (`probe.scoring.tasks.LanguageModeling`): mean next-token NLL per token over
the predicted positions, padding excluded through the attention mask. The stream statistics are
reduced inside forward hooks, batch by batch: memory does not grow with the number of sequences.
The data must be re-iterable (a DataLoader or a list): every evaluation passes over it again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from torch import nn

# Each part in its module; every public name, the tables' columns included, is also importable from here.
from analyses.registry import Analysis, Job
from analyses.lm.agreement import AGREEMENT_COLUMNS, score_agreement
from analyses.lm.deletions import DELETION_COLUMNS, Deletions, check_lm_table, single_deletion_table, single_deletions
from analyses.lm.finding import depth_finding
from analyses.lm.greedy import GREEDY_COLUMNS, ORDERS, check_steps, greedy_deletion, greedy_table
from analyses.lm.influence import (ANGLE_COLUMNS, SIMILARITY_COLUMNS, angle_table, layer_similarity, residual_angles,
                                   similarity_table)
from analyses.lm.lens import LENS_COLUMNS, lens_table, logit_lens
from analyses.lm.spans import (SPAN_COLUMNS, SPAN_LOSS_COLUMNS, best_spans, check_spans, span_loss_table, span_losses,
                               span_summary)
from analyses.lm.stream import stream_pass
from analyses.lm.units import LM, layers_of
from probe.commands.config import RunConfig
from probe.commands.inputs import load_inputs
from probe.deletion.store import OutcomeStore
from probe.discovery.decoder import final_norm, lens_parts
from probe.discovery.find import Block
from probe.errors import ProbeError
from probe.scoring.tasks import LanguageModeling, Task, resolve_task

__all__ = ["LMResult", "best_spans", "depth_finding", "final_norm", "greedy_deletion", "layer_similarity",
           "lens_parts", "lm_layers", "logit_lens", "residual_angles", "score_agreement", "single_deletions",
           "span_losses", "span_summary"]


@dataclass(frozen=True)
class LMResult:
    """What `lm_layers` found; every table's columns:

    layers: one row per layer (kind "layer") and per sublayer (kind "sublayer", one of probe's
        blocks): kind, unit (the layer's name, e.g. "model.layers.3", or the block's,
        "model.layers.3[mlp]"), layer (the layer's name), layer_index (0-based, forward order),
        sublayer (the bracketed part of a block's name, "self_attn", "mlp"; "" for a layer),
        position (the block's forward position; a layer's first block's), block_influence (mean
        over real tokens of 1 - cos(stream in, stream out)), angular_distance (mean of
        arccos(cos) / pi), tokens (real tokens averaged over), and what deleting the unit alone
        does (`probe.scoring.tasks.LanguageModeling`): loss (mean NLL per token), perplexity,
        token_accuracy, loss_increase (over the intact model), loss_increase_se (its standard
        error, from the paired per-sequence differences), ratio (||F(x)|| / ||s(x)|| of a
        sublayer, from the per-block table when it has it; NaN otherwise).
    spans: one row per span length n (`span_summary`).
    span_losses: one row per span of n consecutive layers (`span_losses`).
    greedy: one row per (order, k) (`greedy_deletion`).
    agreement: one row per (kind, cheap score) (`score_agreement`).
    lens: one row per stream: the embeddings and the output of each layer (`logit_lens`); empty
        when the lens does not apply (`notes["lens"]` says why).
    finding: one sentence (`depth_finding`).
    notes: {part: why it is empty, or what to keep in mind}.
    baseline: the intact model's numbers (loss, perplexity, token_accuracy, tokens, ...).
    """

    layers: pd.DataFrame
    spans: pd.DataFrame
    span_losses: pd.DataFrame
    greedy: pd.DataFrame
    agreement: pd.DataFrame
    lens: pd.DataFrame
    finding: str
    notes: dict[str, str] = field(default_factory=dict)
    baseline: dict = field(default_factory=dict)

    def tables(self) -> dict[str, pd.DataFrame]:
        """{CSV name: table} of every table (probe.files.write_tables writes them)."""
        return {"lm_layers": self.layers, "lm_spans": self.spans, "lm_span_losses": self.span_losses,
                "lm_greedy": self.greedy, "lm_agreement": self.agreement, "lm_logit_lens": self.lens}


def lm_layers(model: nn.Module, data: Iterable, *, table: pd.DataFrame | None = None,
              blocks: Sequence[str | Block] | None = None, spans: Iterable[int] | None = None,
              greedy_steps: int | None = None, resamples: int = 1000, level: float = 0.95, seed: int = 0,
              fit: bool = False, progress: bool = True, store: OutcomeStore | None = None) -> LMResult:
    """Every part of the analysis (module docstring), sharing its passes over the data.

    One pass with hooks gives the similarities, the span angles and the logit lens; one
    `probe.evaluate_ablations` call evaluates every single layer, single block (unless `table`
    gives them) and span; then one call per greedy step, and one for the one-shot orders. A set
    of layers is evaluated once however many parts ask for it.

    table: the per-block table of the lm task (`probe.block_table(..., task="lm")`, or
    blocks.csv of `python -m probe.ablate --task lm`): its single-block losses are reused and its
    `ratio` column becomes a cheap score. blocks: the blocks (names or Blocks); discovered on the
    data's first sequence when None. spans: the span lengths (default 1..L-1). greedy_steps:
    layers the greedy search removes (default L // 2). resamples, level, seed: the bootstrap of
    `score_agreement`. fit: settings made for deep models (the CLI's defaults) are fitted to this
    one, with a note: span lengths longer than its layers are left out, greedy steps capped at
    its layers - 1; without, they are refused (ProbeError). store: the job's outcomes
    (`probe.deletion.store.OutcomeStore`): sets it holds (the sweep's single blocks) are reused.
    """
    stack = layers_of(model, data, blocks)
    count = len(stack.names)
    notes: dict[str, str] = {}
    if fit and spans is not None:
        longer = sorted(n for n in set(spans) if isinstance(n, (int, np.integer)) and n > count)
        if longer:
            notes["spans"] = f"span lengths {longer} left out: the model has {count} layers."
            spans = [n for n in spans if n not in longer]
    if fit and isinstance(greedy_steps, int) and count > 1 and greedy_steps > count - 1:
        notes["greedy"] = f"greedy deletion stops after {count - 1} steps: the model has {count} layers."
        greedy_steps = count - 1
    span_lengths = check_spans(spans, count)
    steps = check_steps(greedy_steps, count)
    checked = check_lm_table(table, model, stack) if table is not None else None
    try:
        parts = lens_parts(model, stack.names)
    except ProbeError as error:
        parts = None
        notes["lens"] = str(error)
    sums = stream_pass(model, data, stack, angles=True, lens=parts, progress=progress)
    similarity, angles = similarity_table(stack, sums), angle_table(stack, sums)
    deletions = Deletions(model, data, stack, progress, store)
    # One evaluation pass for every single deletion and every span.
    deletions.outcomes([[name] for name in stack.names]
                       + ([[b.name] for b in stack.every_block] if checked is None else [])
                       + [stack.names[start:start + n] for n in span_lengths for start in range(count + 1 - n)])
    layers = similarity.merge(single_deletion_table(deletions, stack, checked), on=["kind", "unit"], how="left")
    ratio = checked.set_index("block")["ratio"] if checked is not None and "ratio" in checked.columns else None
    layers["ratio"] = layers["unit"].map(ratio) if ratio is not None else float("nan")
    layers.loc[layers["kind"] == "layer", "ratio"] = float("nan")
    layers["ratio"] = pd.to_numeric(layers["ratio"], errors="coerce")
    layers.attrs["baseline"] = LM.metrics(deletions.baseline)
    losses = span_loss_table(deletions, stack, angles, span_lengths)
    greedy = greedy_table(deletions, stack, steps, layers)
    agreement = score_agreement(layers, resamples=resamples, level=level, seed=seed)
    lens = lens_table(stack, sums) if parts is not None else pd.DataFrame(columns=LENS_COLUMNS)
    if len(lens) and lens["agreement"].iloc[-1] < 1.0 - 1e-9:
        notes["lens_head"] = (f"after the last layer the lens agrees with the model's own prediction on only "
                              f"{lens['agreement'].iloc[-1]:.2%} of the tokens: the model's head does more than the "
                              "final norm and the unembedding (a logit scale or soft-capping?).")
    return LMResult(layers=layers, spans=span_summary(losses), span_losses=losses, greedy=greedy,
                    agreement=agreement, lens=lens, finding=depth_finding(layers), notes=notes,
                    baseline=LM.metrics(deletions.baseline))


def _in_job(job: Job) -> LMResult:
    config = job.config
    return lm_layers(job.model, job.data, table=job.table, blocks=job.blocks, spans=config.spans,
                     greedy_steps=config.greedy_steps, resamples=config.bootstrap, level=config.level,
                     seed=config.seed, fit=True, progress=job.progress, store=job.store)


def _alone(config: RunConfig, out: Path, progress: bool) -> LMResult:
    if not isinstance(resolve_task(config.task), LanguageModeling):
        raise ProbeError(f"python -m analyses.lm analyses causal language models; the task is {config.task!r}: give "
                         "--task lm (and a language model with token data).")
    inputs = load_inputs(config, progress=progress)
    return lm_layers(inputs.model, inputs.data, blocks=inputs.blocks, spans=config.spans,
                     greedy_steps=config.greedy_steps, resamples=config.bootstrap, level=config.level,
                     seed=config.seed, fit=True, progress=progress)


def _applies(task: Task, config: RunConfig) -> str | None:
    if isinstance(task, LanguageModeling):
        return None
    return "it deletes decoder layers of a causal language model; it applies to the task 'lm' only."


ANALYSIS = Analysis(
    name="lm", order=70, in_job=_in_job, alone=_alone,
    options=("model", "uncertainty", "lm"),  # "lm": the group of --spans and --greedy-steps
    summary="a language model's layers: block influence, angular distance, best spans, greedy deletion, logit lens",
    applies=_applies, leads_report=True, silent_unless_run=True)
