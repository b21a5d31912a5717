"""Nord: decentralized volunteer training of sparse spiking language models.

Modules, one idea each:
    errors      the exception family (`NordError` and its kinds)
    config      `RunConfig`: everything peers of one run must agree on
    data        corpus preparation, tokenizer, token batches and worker shards
    neurons     spiking neurons: LIF and the dynamic-decay neuron (naive + chunked scan)
    model       the spiking language model; recipes (tiny .. nord-1b); memory (T4 estimator)
    ttfs        the MLPs run as time-to-first-spike networks, exactly equal to their ReLU twin
    train       the inner training loop, `nord train`; generate, evaluate: `nord generate`, `nord eval`
    shards      parameter shards: which tensors a worker trains and sends
    codec       masked 4-bit sparse deltas with error feedback, signed envelopes
    crdt        the OR-Set of contributions whose replicas converge bit for bit
    checkpoint  atomic safetensors checkpoints with config metadata
    transport   hivemind DHT and P2P streams (the only module that imports hivemind)
    gossip      anti-entropy between replicas over the transport
    demo        `nord demo`: a coordinator and workers on one machine
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
