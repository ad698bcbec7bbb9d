"""Domain weights and the domain-mixed token stream (LLaMA-MoE's data sampling).

    from samplers import update_weights, SamplerConfig, PackedTokens, DomainStream

`import samplers` stays light (numpy, yaml): torch is imported only when a stream yields a batch.
"""
from samplers.config import SamplerConfig, load_reference_file
from samplers.packed import PackedTokens
from samplers.rules import RULES, update_weights
from samplers.stream import DomainExhaustedWarning, DomainStream, read_sequences

__all__ = ["update_weights", "RULES", "SamplerConfig", "load_reference_file", "PackedTokens", "DomainStream",
           "DomainExhaustedWarning", "read_sequences"]
