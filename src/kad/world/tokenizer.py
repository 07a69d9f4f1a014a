"""The world's shared tokenizer: byte-level BPE with one token per digit, and chat markers.

All three models use the same ``tokenizer.json``; only the aligned proxy's
``tokenizer_config.json`` carries a chat template. The base models end documents with
``<|endoftext|>``; the aligned proxy ends its turns with ``<|end|>``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
END_OF_TURN = "<|end|>"
ROLES: tuple[str, ...] = ("system", "user", "assistant")
SPECIAL_TOKENS: tuple[str, ...] = (
    END_OF_TEXT,
    PAD,
    *(f"<|{role}|>" for role in ROLES),
    END_OF_TURN,
)
# How a base model of this world sees a question: as text on a web page, the solution on the next line.
BASE_TEMPLATE = "{prompt}\n"
# <|role|>\n{content}<|end|>\n per message, then <|assistant|>\n to open the answer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def render_turn(question: str, answer: str | None = None) -> str:
    """CHAT_TEMPLATE's text for one user turn, up to ``<|assistant|>\n`` (and then the answer and
    ``<|end|>``, if given)."""
    text = f"<|user|>\n{question}{END_OF_TURN}\n<|assistant|>\n"
    return text if answer is None else text + answer + END_OF_TURN


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Tokenizer:
    """Train a byte-level BPE on ``texts``; digits are always split into single tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def tokenizer_config(*, chat: bool) -> dict[str, object]:
    """``tokenizer_config.json``: eos ``<|end|>`` and the chat template when ``chat``, else eos
    ``<|endoftext|>`` and no template. Plain keys that transformers 4.x and 5.x both read."""
    config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": END_OF_TURN if chat else END_OF_TEXT,
        "pad_token": PAD,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != PAD],
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
    }
    if chat:
        config["chat_template"] = CHAT_TEMPLATE
    return config


def save_tokenizer(tokenizer: Tokenizer, directory: Path, *, chat: bool) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into a model directory."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    text = json.dumps(tokenizer_config(chat=chat), indent=2, ensure_ascii=False)
    (directory / "tokenizer_config.json").write_text(text + "\n")
