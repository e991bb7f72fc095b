"""The monitor layer: residual-norm and attention statistics of a patched ViT, and ``patch_timm(monitor=...)``.

norm_monitor.py   NormMonitor (device accumulators fed by the kernels' side outputs), NormReport
attach.py         patch_timm: regkern.timm's patching plus an attached NormMonitor
"""

from ..timm.patching import get_monitor
from .attach import patch_timm
from .norm_monitor import ATTENTION_GROUPS, GROUPS, NormMonitor, NormReport

__all__ = ["NormMonitor", "NormReport", "GROUPS", "ATTENTION_GROUPS", "patch_timm", "get_monitor"]
