"""`python -m analyses.degradation`: writes degradation.csv and degradation.png into --out."""

from __future__ import annotations

from analyses.command import main_for


def main(argv: list[str] | None = None) -> int:
    return main_for("degradation", argv)


if __name__ == "__main__":
    raise SystemExit(main())
