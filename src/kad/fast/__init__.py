"""The CUDA fast path: the compact Llama-family forward over static slot pools, compiled layers,
and decoding rounds captured as CUDA graphs (`kad.runtime` runs them).
"""

from kad.fast.llama import unsupported_reason
from kad.fast.runner import StaticRunner

__all__ = ["StaticRunner", "unsupported_reason"]
