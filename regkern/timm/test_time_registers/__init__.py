"""Test-time registers (Jiang et al., 2025, "Vision Transformers Don't Need Trained Registers").

In a trained ViT a few MLP neurons ("register neurons") fire strongly on a handful of low-information patch tokens
and write the large vectors that make those tokens the high-norm outliers. Test-time registers move that behaviour
into extra tokens without any training:

    detection.py        ``find_register_neurons(model, images)``: the outlier tokens and the neurons behind them
    application.py      ``apply_test_time_registers(model, neurons, num=1)``: extra tokens that take over those
                        neurons' activations, for every batch element; ``handle.remove()`` restores the model
    model_structure.py  what both need of a timm ViT/Eva (blocks with ``mlp.fc2``, prefix counts, hook helpers)
"""

from .application import NeuronSpec, TestTimeRegisters, apply_test_time_registers
from .detection import RegisterNeurons, find_register_neurons

__all__ = ["RegisterNeurons", "find_register_neurons", "TestTimeRegisters", "apply_test_time_registers", "NeuronSpec"]
