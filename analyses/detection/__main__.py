"""`python -m analyses.detection`: writes detection.csv, detection_views.csv, detection_boxes.csv
and the figures of the detection page into --out."""

from __future__ import annotations

from analyses.command import main_for


def main(argv: list[str] | None = None) -> int:
    return main_for("detection", argv)


if __name__ == "__main__":
    raise SystemExit(main())
