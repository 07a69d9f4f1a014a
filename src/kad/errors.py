"""Errors that name a problem with the user's input.

The CLI turns a `KadError` into its message and exit code 2; the server into a 4xx JSON body.
Anything else that escapes is a bug.
"""

from __future__ import annotations


class KadError(ValueError):
    """Bad input from the user: a message that says what is wrong and how to fix it."""


class VocabularyMismatchError(KadError):
    """The models' tokenizers disagree on a token id inside the range they must share."""


class ModelNotFoundError(KadError):
    """A model path that does not exist, or a Hub id that cannot be fetched offline."""


class PromptError(KadError):
    """An empty prompt, or one that does not fit in a model's context window."""


class ContextLengthError(PromptError):
    """A prompt (with its continuation, when scoring) longer than a model's context window."""
