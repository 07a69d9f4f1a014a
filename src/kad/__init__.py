"""kad: proxy-based test-time alignment with knapsack approximation deferral (KAD).

A large base model p is steered token by token by a small aligned proxy q* that shares its
vocabulary, and decoded fast with the proxy as a lossless speculative drafter.
"""

from kad.aligner import Aligner
from kad.errors import (
    ContextLengthError,
    KadError,
    ModelNotFoundError,
    PromptError,
    VocabularyMismatchError,
)
from kad.models import Prompt, Raw
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
