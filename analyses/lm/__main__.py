"""`python -m analyses.lm`: writes lm_layers.csv, lm_spans.csv, lm_span_losses.csv, lm_greedy.csv,
lm_agreement.csv and lm_logit_lens.csv, with their figures (lm_similarity.png, lm_spans.png,
lm_greedy.png, lm_agreement.png, lm_logit_lens.png when the lens applies), into --out."""

from __future__ import annotations

from pathlib import Path

import analyses.lm
from analyses.lm import lm_layers
from probe.commands.runner import run_analysis_command
from probe.commands.config import RunConfig
from probe.errors import ProbeError
from probe.files import write_tables
from probe.commands.inputs import load_inputs
from probe.scoring.tasks import LanguageModeling, resolve_task
from reports import figures
from reports.embed import write_png


def main(argv: list[str] | None = None) -> int:
    # "lm": the group of --spans and --greedy-steps.
    return run_analysis_command("lm", analyses.lm.__doc__, ("model", "uncertainty", "lm"), _write, argv)


def _write(config: RunConfig, out: Path, progress: bool) -> list[Path]:
    if not isinstance(resolve_task(config.task), LanguageModeling):
        raise ProbeError(f"python -m analyses.lm analyses causal language models; the task is {config.task!r}: give "
                         "--task lm (and a language model with token data).")
    inputs = load_inputs(config, progress=progress)
    result = lm_layers(inputs.model, inputs.data, blocks=inputs.blocks, spans=config.spans,
                       greedy_steps=config.greedy_steps, resamples=config.bootstrap, level=config.level,
                       seed=config.seed, fit=True, progress=progress)
    layers = result.layers[result.layers["kind"] == "layer"]
    print(layers[["unit", "block_influence", "angular_distance", "loss_increase"]]
          .to_string(index=False, float_format="{:.4f}".format))
    print(result.spans[["n", "start_by_angle", "loss_by_angle", "start_by_loss", "loss_by_loss"]]
          .to_string(index=False, float_format="{:.4f}".format))
    print(result.agreement.to_string(index=False, float_format="{:.3f}".format))
    print("\n" + result.finding)
    for part, why in result.notes.items():
        print(f"{part}: {why}")
    written = write_tables(out, result.tables())
    width = figures.block_figure_width(len(layers))
    written.append(write_png(out / "lm_similarity.png", figures.layer_similarity_plot, result.layers, width=width))
    if len(result.spans):
        written.append(write_png(out / "lm_spans.png", figures.span_plot, result.spans))
    written.append(write_png(out / "lm_greedy.png", figures.greedy_curves, result.greedy))
    written.append(write_png(out / "lm_agreement.png", figures.agreement_intervals, result.agreement))
    if len(result.lens):
        written.append(write_png(out / "lm_logit_lens.png", figures.logit_lens_plot, result.lens,
                                 width=figures.block_figure_width(len(result.lens))))
    return written


if __name__ == "__main__":
    raise SystemExit(main())
