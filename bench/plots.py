"""matplotlib for the benchmarks that also run on the GPU device, whose image may lack it."""

from __future__ import annotations

import logging
from types import ModuleType

log = logging.getLogger(__name__)


def pyplot() -> ModuleType | None:
    """matplotlib.pyplot on the Agg backend, or None (with a warning) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: no plot")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
