"""Model plumbing: loading a causal LM, the shared-vocabulary check, and prompt rendering.

The prompt types (`Prompt`, `Raw`) live in the light `kad.prompt` and are re-exported here.

Each model renders a prompt its own way (SPEC section 1): the aligned proxy through its chat
template, the base as raw text. The generated continuation is one token sequence shared by all.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kad.errors import KadError, ModelNotFoundError, PromptError, VocabularyMismatchError
from kad.prompt import Message, Prompt, PromptPart, Raw, check_text, part_texts

Template = None | str | Callable[[Any], str]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None: float32 on CPU, bfloat16 on an accelerator."""
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise KadError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise KadError(f"unknown device {device!r}: {err}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise KadError(f"device {device!r} was asked for, but no CUDA GPU is available")
    return resolved


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~"))
        or spec.endswith(".gguf")
        or os.sep + os.sep in spec
    )


def hub_options(repo_id: str) -> dict[str, Any]:
    """``from_pretrained``'s options for a Hub id: ``local_files_only`` when the Hub does not
    answer one request within HF_HUB_ETAG_TIMEOUT seconds (huggingface_hub would retry each file
    with backoff, for minutes), so that a model in the local Hub cache loads at once, as with
    HF_HUB_OFFLINE=1. A model that is not cached, offline or with the Hub silent, is a
    `ModelNotFoundError` saying what to do."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except HFValidationError as err:
        raise ModelNotFoundError(f"model {repo_id!r}: no such path, nor a Hub id ({err})") from None
    where = f"model {repo_id!r}: no such path, nor in the Hub cache {constants.HF_HUB_CACHE}"
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise ModelNotFoundError(
                f"{where}, and HF_HUB_OFFLINE=1 is set: download it once online "
                f"(`hf download {repo_id}`), or give a local directory"
            )
        return {}
    try:
        get_hf_file_metadata(
            hf_hub_url(repo_id, "config.json"), timeout=constants.HF_HUB_ETAG_TIMEOUT
        )
    except HfHubHTTPError:
        return {}  # the Hub answered (no such repo, gated, ...): from_pretrained says what
    except Exception as err:  # no answer: refused, timed out, no route, no name resolution
        if cached:
            return {"local_files_only": True}
        raise ModelNotFoundError(
            f"{where}, and the Hub ({constants.ENDPOINT}) does not answer ({err}): set "
            "HF_HUB_OFFLINE=1 to load cached models only, or give a local directory"
        ) from None
    return {}


def load_causal_lm(
    spec: str | os.PathLike,
    *,
    dtype: torch.dtype,
    device: torch.device,
    device_map: str | dict | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer from a local directory, a GGUF file, or a Hub id (see
    `hub_options`)."""
    spec = str(spec)
    path = Path(spec).expanduser()
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelNotFoundError(
                    f"{spec}: a model file must be GGUF (.gguf); otherwise give a model directory"
                )
            source, kwargs["gguf_file"] = str(path.parent), path.name
        else:
            source = str(path)
    elif _looks_like_path(spec):
        raise ModelNotFoundError(f"model path {spec!r} does not exist")
    else:
        source = spec
        kwargs |= hub_options(spec)
    tok_kwargs = {k: v for k, v in kwargs.items() if k in ("gguf_file", "local_files_only")}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **tok_kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set: only cached Hub models load)" if offline else ""
        raise ModelNotFoundError(f"could not load model {spec!r}{hint}: {err}") from None
    if device_map is None:
        model.to(device)
    model.eval()
    return model, tokenizer


def shared_vocab_size(
    tokenizers: Sequence[PreTrainedTokenizerBase], embedding_rows: Sequence[int]
) -> int:
    """The common id range [0, n) on which every tokenizer maps ids to the same strings.

    Ids beyond the shortest tokenizer or embedding matrix are dropped (padded rows, extra chat
    markers). A disagreement inside the range is an error naming the first bad id, unless every id
    from there on is an added (special) token of some tokenizer: then the range ends there.
    """
    limit = min([len(t) for t in tokenizers] + list(embedding_rows))
    vocabs = [{i: s for s, i in t.get_vocab().items() if i < limit} for t in tokenizers]
    added = set()
    for tok in tokenizers:
        added.update(i for i in tok.added_tokens_decoder if i < limit)
    reference = vocabs[0]
    for vocab in vocabs[1:]:
        bad = sorted(i for i in range(limit) if vocab.get(i) != reference.get(i))
        if not bad:
            continue
        first = bad[0]
        if all(i in added for i in range(first, limit)):
            limit = first
            continue
        raise VocabularyMismatchError(
            f"the models' tokenizers disagree at token id {first}: "
            f"{reference.get(first)!r} vs {vocab.get(first)!r}. KAD needs models that share a "
            "vocabulary (the same id must mean the same string), e.g. members of one model family"
        )
    return limit


def transcript(messages: Sequence[Message]) -> str:
    """A chat as plain text, for base models: 'User: ...', 'Assistant: ...', then 'Assistant:'."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join([*lines, "Assistant:"])


def _check_messages(messages: Sequence[Any]) -> list[Message]:
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise PromptError(f"a chat message needs 'role' and 'content', got {m!r}")
    return list(messages)


@dataclass
class PromptRenderer:
    """Turns a prompt part into text for one model.

    template None: the model's chat template if ``use_chat_template`` and it has one, else raw text
    (messages as a plain transcript). A string: ``"{prompt}"`` is replaced by the prompt text. A
    callable: called with the prompt (a str, or the list of messages).
    """

    tokenizer: PreTrainedTokenizerBase
    use_chat_template: bool
    template: Template = None

    def render(self, part: PromptPart) -> str:
        """The text this model reads; `PromptError` for text that is not valid Unicode."""
        for what, text in part_texts(part):
            check_text(text, what)
        if isinstance(part, Raw):
            return part.text
        if callable(self.template):
            return self.template(part)
        messages = None if isinstance(part, str) else _check_messages(part)
        if isinstance(self.template, str):
            return self.template.replace("{prompt}", transcript(messages) if messages else part)
        if self.use_chat_template and getattr(self.tokenizer, "chat_template", None):
            chat = messages or [{"role": "user", "content": part}]
            return self.tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=True
            )
        return part if messages is None else transcript(messages)

    def encode(self, part: PromptPart) -> list[int]:
        """Token ids; special tokens (BOS) are added only to text that no template rendered."""
        templated = not isinstance(part, Raw) and (
            self.template is not None
            or (self.use_chat_template and getattr(self.tokenizer, "chat_template", None))
        )
        text = self.render(part)
        ids = self.tokenizer(text, add_special_tokens=not templated)["input_ids"]
        if not text.strip() or not ids:
            raise PromptError("the prompt is empty")
        return list(ids)


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """EOS ids from the generation config, the model config and the tokenizer."""
    found: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            found.update([value] if isinstance(value, int) else value)
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found


def context_length(model: PreTrainedModel) -> int:
    """The longest sequence the model's positions allow (a large number if it does not say)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30


__all__ = [
    "Message",
    "Prompt",
    "PromptPart",
    "PromptRenderer",
    "Raw",
    "Template",
    "context_length",
    "eos_ids",
    "load_causal_lm",
    "resolve_device",
    "resolve_dtype",
    "shared_vocab_size",
    "transcript",
]
