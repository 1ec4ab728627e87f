"""`python -m analyses.representation`: writes linear_probes.csv, logit_lens.csv, refinement.csv,
cka.csv, block_classes.csv and representation.csv, with their figures (representation_accuracy.png,
refinement.png, cka.png, block_classes.png; for a task without class labels only those of the tables
that apply), into --out."""

from __future__ import annotations

from analyses.command import main_for


def main(argv: list[str] | None = None) -> int:
    return main_for("representation", argv)


if __name__ == "__main__":
    raise SystemExit(main())
