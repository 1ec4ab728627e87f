"""`python -m analyses.lm`: writes lm_layers.csv, lm_spans.csv, lm_span_losses.csv, lm_greedy.csv,
lm_agreement.csv and lm_logit_lens.csv, with their figures (lm_similarity.png, lm_spans.png,
lm_greedy.png, lm_agreement.png, lm_logit_lens.png when the lens applies), into --out."""

from __future__ import annotations

from analyses.command import main_for


def main(argv: list[str] | None = None) -> int:
    return main_for("lm", argv)


if __name__ == "__main__":
    raise SystemExit(main())
