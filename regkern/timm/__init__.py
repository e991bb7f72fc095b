"""The timm integration layer: patching timm models, adding registers, test-time registers.

    patching.py            patch_attention / unpatch_timm, prefix counters, what regkern keeps on a patched model
    registers.py           add_registers (tokens or KV-only), register_parameters, freeze_all_but_registers
    test_time_registers/   find_register_neurons (detection), apply_test_time_registers (application)

(``regkern.patch_timm``, which can also attach a NormMonitor, is the monitor layer's.)
"""

from .patching import (
    KNOWN_UNSUPPORTED,
    get_monitor,
    patch_attention,
    patched_modules,
    prefix_counters,
    supported_attention_classes,
    unpatch_timm,
)
from .registers import REGISTER_PARAMETER_NAMES, add_registers, freeze_all_but_registers, register_parameters
from .test_time_registers import (
    NeuronSpec,
    RegisterNeurons,
    TestTimeRegisters,
    apply_test_time_registers,
    find_register_neurons,
)

__all__ = [
    "patch_attention",
    "unpatch_timm",
    "get_monitor",
    "prefix_counters",
    "supported_attention_classes",
    "KNOWN_UNSUPPORTED",
    "patched_modules",
    "add_registers",
    "register_parameters",
    "freeze_all_but_registers",
    "REGISTER_PARAMETER_NAMES",
    "find_register_neurons",
    "apply_test_time_registers",
    "RegisterNeurons",
    "TestTimeRegisters",
    "NeuronSpec",
]
