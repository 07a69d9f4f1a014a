"""Terminal rendering shared by `kad generate` and `kad demo`: tokens coloured by deferral."""

from __future__ import annotations

import math

from rich.text import Text


def deferral_text(tokenizer, token_ids: list[int], shares: list[float]) -> Text:
    """The continuation with each token coloured by where its probability came from."""
    text = Text()
    previous = ""
    for i, share in enumerate(shares):
        current = tokenizer.decode(token_ids[: i + 1], skip_special_tokens=True)
        piece, previous = current[len(previous) :], current
        if math.isnan(share):
            style = "white"
        elif share < 0.1:
            style = "cyan"
        elif share > 0.9:
            style = "bold magenta"
        else:
            style = "yellow"
        text.append(piece, style=style)
    return text


DEFERRAL_LEGEND = Text.assemble(
    ("kept from the base", "cyan"),
    "  ",
    ("mixed", "yellow"),
    "  ",
    ("deferred to the proxy", "bold magenta"),
)
