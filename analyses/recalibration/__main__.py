"""`python -m analyses.recalibration`: writes recalibration.csv and recalibration.png into --out."""

from __future__ import annotations

from analyses.command import main_for


def main(argv: list[str] | None = None) -> int:
    return main_for("recalibration", argv)


if __name__ == "__main__":
    raise SystemExit(main())
