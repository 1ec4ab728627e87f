"""`python -m analyses.attribution`: writes attribution.csv, proxies.csv and proxies.png into --out."""

from __future__ import annotations

from analyses.command import main_for


def main(argv: list[str] | None = None) -> int:
    return main_for("attribution", argv)


if __name__ == "__main__":
    raise SystemExit(main())
