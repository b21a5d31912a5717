"""Time-to-first-spike MLPs (Stanojevic et al. 2024): trained as ReLU networks, run as one-spike networks.

simulate.py  the TTFS neuron: event-driven layer simulation (the spec), its closed form, the clock
             and spike-time jitter
mlp.py       a block's MLP as encoder → TTFS hidden layer → non-spiking read-out; its ReLU twin
             (with hardware constraints and straight-through gradients); `TTFSMLP` (the run-time
             module a `ModelConfig(mlp="ttfs")` block holds); calibration and spike statistics
"""

from nord.ttfs.mlp import (
    ENGINES,
    TTFSMLP,
    TTFSConstraints,
    TTFSResult,
    TTFSStats,
    Windows,
    calibrate,
    collect_stats,
    configure,
    quantize_weights,
    relu_twin,
    ttfs_layers,
    ttfs_mlp,
)
from nord.ttfs.simulate import fire_closed, fire_events, read_out_closed, read_out_events

__all__ = [
    "ENGINES",
    "TTFSMLP",
    "TTFSConstraints",
    "TTFSResult",
    "TTFSStats",
    "Windows",
    "calibrate",
    "collect_stats",
    "configure",
    "fire_closed",
    "fire_events",
    "quantize_weights",
    "read_out_closed",
    "read_out_events",
    "relu_twin",
    "ttfs_layers",
    "ttfs_mlp",
]
