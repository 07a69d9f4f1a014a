"""The prompt types, light enough for the CLI: user text, chat messages, `Raw` and `Prompt`.

`check_text` rejects text a tokenizer cannot take (unpaired surrogates: what Python makes of
bytes that are not UTF-8 in a command-line argument). `kad.models` renders and encodes prompts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from kad.errors import PromptError

Message = dict[str, str]
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Raw:
    """Text passed to a model verbatim, past any template."""

    text: str


PromptPart = str | Raw | Sequence[Message]


@dataclass(frozen=True)
class Prompt:
    """One prompt with a rendering per model: e.g. few-shot text for the base, a chat turn for
    the proxy. A field left None falls back to the other one (``base`` to ``proxy``)."""

    base: PromptPart | None = None
    proxy: PromptPart | None = None

    def __post_init__(self) -> None:
        if self.base is None and self.proxy is None:
            raise PromptError("a Prompt needs base= or proxy= text")


def check_text(text: str, what: str = "prompt") -> None:
    """Raise `PromptError` if ``text`` is not valid Unicode: an unpaired surrogate (U+D800 to
    U+DFFF) cannot be encoded as UTF-8, so no tokenizer takes it. ``what`` names the text."""
    match = _SURROGATE_RE.search(text)
    if match:
        raise PromptError(
            f"{what} contains an unpaired surrogate (U+{ord(match.group()):04X}) at character "
            f"{match.start()}; text must be valid Unicode (command-line arguments: valid UTF-8)"
        )


def part_texts(part: PromptPart) -> Iterator[tuple[str, str]]:
    """(what, text) of every piece of user text in a prompt part: the text of a str or `Raw`,
    or each chat message's role and content."""
    if isinstance(part, Raw):
        yield "prompt", part.text
    elif isinstance(part, str):
        yield "prompt", part
    else:
        for i, message in enumerate(part):
            for key in ("role", "content"):
                value = message.get(key) if isinstance(message, dict) else None
                if isinstance(value, str):
                    yield f"chat message {i}'s {key}", value
