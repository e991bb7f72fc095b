"""matplotlib for the apps' pictures (demo attention maps, inspect panels, bench speedups), without a display."""

from __future__ import annotations

__all__ = ["pyplot"]


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    # lazy import of matplotlib: only the commands that draw need it, and it is slow to import
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
