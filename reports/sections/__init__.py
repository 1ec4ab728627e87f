"""One report section per analysis: its figures with captions, its tables, and what it found.

Each module (``reports.sections.skipping``, ...) builds one analysis's `Section` from the tidy
tables it returned; ``reports.sections.common`` holds the records the HTML template renders.
Captions are written for a reader who has never seen probe: each says what one mark on the
figure is, how it was measured, and what a high or low value means.
"""

import importlib
import pkgutil

from reports.sections.common import Figure, Section, Table, format_cell, is_number, not_run_section
from reports.sections.attribution import attribution_section
from reports.sections.degradation import degradation_section
from reports.sections.detection import detection_section
from reports.sections.lm import lm_section
from reports.sections.recalibration import recalibration_section
from reports.sections.representation import representation_section
from reports.sections.skipping import skipping_section
from reports.sections.uncertainty import uncertainty_section

# Each page's heading, by section id: every module here but `common` is an analysis's page.
TITLES = {info.name: importlib.import_module(f"{__name__}.{info.name}").TITLE
          for info in pkgutil.iter_modules(__path__) if info.name != "common"}

__all__ = ["Figure", "Section", "TITLES", "Table", "attribution_section", "degradation_section", "detection_section", "format_cell", "is_number", "lm_section", "not_run_section", "recalibration_section", "representation_section", "skipping_section", "uncertainty_section"]
