"""Spiking neurons: pure step/scan functions on NamedTuple state, thin `nn.Module`s around them.

surrogate  `spike` (Heaviside forward, surrogate backward), `integer_spike`, `SURROGATES`
naive      `dynamic_decay_naive`: the float32 loop h_t = exp(log_a_t)·h_{t−1} + x_t (the spec)
chunk      `dynamic_decay_chunk`: the same recurrence, sequential in place or as a chunked parallel scan
lif        LIF with soft reset: `lif_step`, `lif_scan`, `LIFNeuron` (the sequential baseline)
dynamic    the dynamic-decay neuron (Huang et al. 2026): `DynamicDecayNeuron`
fused      its C++ CPU kernel (gates, scan and backward in one pass over time), built once and cached
"""

from nord.neurons.chunk import dynamic_decay_chunk
from nord.neurons.dynamic import (
    DynamicDecayNeuron,
    DynamicDecayParams,
    DynamicDecayState,
    dynamic_decay_neuron_scan,
    dynamic_decay_neuron_step,
)
from nord.neurons.lif import LIFNeuron, LIFParams, LIFState, lif_scan, lif_step
from nord.neurons.naive import dynamic_decay_naive
from nord.neurons.surrogate import SURROGATES, integer_spike, spike

dynamic_decay_scan = dynamic_decay_chunk

__all__ = [
    "SURROGATES",
    "DynamicDecayNeuron",
    "DynamicDecayParams",
    "DynamicDecayState",
    "LIFNeuron",
    "LIFParams",
    "LIFState",
    "dynamic_decay_chunk",
    "dynamic_decay_naive",
    "dynamic_decay_neuron_scan",
    "dynamic_decay_neuron_step",
    "dynamic_decay_scan",
    "integer_spike",
    "lif_scan",
    "lif_step",
    "spike",
]
