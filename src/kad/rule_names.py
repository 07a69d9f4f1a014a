"""The names of the rules and losses, light enough for the command line's help.

`kad.rules` (which imports torch) defines the rules themselves; a test checks that the names
here are its names.
"""

from __future__ import annotations

RULE_NAMES: tuple[str, ...] = ("dual", "primal", "nudging", "implicit-reward", "base", "proxy")
LOSSES: tuple[str, ...] = ("nll", "squared", "margin", "zero_one")
