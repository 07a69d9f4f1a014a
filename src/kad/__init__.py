"""kad: proxy-based test-time alignment with knapsack approximation deferral (KAD).

A large base model p is steered token by token by a small aligned proxy q* that shares its
vocabulary, and decoded fast with the proxy as a lossless speculative drafter.

The names below load on first use (PEP 562), so that ``import kad`` and the command line's
help do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kad.errors import (
    ContextLengthError,
    KadError,
    ModelNotFoundError,
    PromptError,
    VocabularyMismatchError,
)
from kad.prompt import Prompt, Raw

if TYPE_CHECKING:
    from kad.aligner import Aligner
    from kad.outputs import Generation, GenerationStats, StepEvent
    from kad.rules import (
        BaseOnly,
        Dual,
        ImplicitReward,
        Mix,
        Nudging,
        Primal,
        ProxyOnly,
        ProxyReferenced,
        Rule,
        exact_deferral,
        loss_values,
        make_rule,
        mixture,
        risk,
    )
    from kad.sampling import Warp

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "Aligner": "kad.aligner",
    "Generation": "kad.outputs",
    "GenerationStats": "kad.outputs",
    "StepEvent": "kad.outputs",
    "Warp": "kad.sampling",
    **dict.fromkeys(
        (
            "BaseOnly",
            "Dual",
            "ImplicitReward",
            "Mix",
            "Nudging",
            "Primal",
            "ProxyOnly",
            "ProxyReferenced",
            "Rule",
            "exact_deferral",
            "loss_values",
            "make_rule",
            "mixture",
            "risk",
        ),
        "kad.rules",
    ),
}


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first access (``kad.Aligner``, ``kad.Dual``)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kad' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Aligner",
    "BaseOnly",
    "ContextLengthError",
    "Dual",
    "Generation",
    "GenerationStats",
    "ImplicitReward",
    "KadError",
    "Mix",
    "ModelNotFoundError",
    "Nudging",
    "Primal",
    "Prompt",
    "PromptError",
    "ProxyOnly",
    "ProxyReferenced",
    "Raw",
    "Rule",
    "StepEvent",
    "VocabularyMismatchError",
    "Warp",
    "exact_deferral",
    "loss_values",
    "make_rule",
    "mixture",
    "risk",
]
