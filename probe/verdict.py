"""Kept where users import it: the code lives in `probe.scoring.verdict`."""

from probe.scoring.verdict import *  # noqa: F401,F403
from probe.scoring.verdict import __all__  # noqa: F401
