"""`python -m analyses.skipping`: writes skipping.csv, deletion_curves.csv, pruned_export.csv,
pruned_model.pt and deletion_curves.png into --out."""

from __future__ import annotations

from analyses.command import main_for


def main(argv: list[str] | None = None) -> int:
    return main_for("skipping", argv)


if __name__ == "__main__":
    raise SystemExit(main())
