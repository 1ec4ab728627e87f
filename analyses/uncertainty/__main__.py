"""`python -m analyses.uncertainty`: writes drop_intervals.csv, class_drops.csv and their figures
(drop_intervals.png, and class_drops.png for classification) into --out."""

from __future__ import annotations

from analyses.command import main_for


def main(argv: list[str] | None = None) -> int:
    return main_for("uncertainty", argv)


if __name__ == "__main__":
    raise SystemExit(main())
