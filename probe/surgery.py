"""Kept where users import it: the code lives in `probe.deletion.surgery`."""

from probe.deletion.surgery import *  # noqa: F401,F403
from probe.deletion.surgery import __all__  # noqa: F401
