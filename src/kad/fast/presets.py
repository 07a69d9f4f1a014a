"""Built-in configs of real architectures, for benchmarks with random weights (no download).

Each preset is the published config.json of the model (hidden sizes, heads, vocabulary, RoPE), so
a random-weight model has exactly the real one's shapes, bytes and speed. ``PAIRS`` names the
family's small model used as the proxy of each large one.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from kad.errors import KadError

_LLAMA3_ROPE = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}

PRESETS: dict[str, dict[str, Any]] = {
    # meta-llama/Meta-Llama-3-70B (its RoPE as the 8B's: its config.json has no rope_scaling)
    "llama3-70b": dict(
        model_type="llama",
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    # meta-llama/Meta-Llama-3-8B
    "llama3-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    # meta-llama/Llama-3.2-1B
    "llama3.2-1b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    # allenai/OLMo-2-1124-13B
    "olmo2-13b": dict(
        model_type="olmo2",
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=100352,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    # allenai/OLMo-2-0425-1B
    "olmo2-1b": dict(
        model_type="olmo2",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=100352,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    # Qwen/Qwen3-14B
    "qwen3-14b": dict(
        model_type="qwen3",
        hidden_size=5120,
        intermediate_size=17408,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    # Qwen/Qwen3-1.7B
    "qwen3-1.7b": dict(
        model_type="qwen3",
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
}

PAIRS: dict[str, str] = {
    "llama3-70b": "llama3.2-1b",
    "llama3-8b": "llama3.2-1b",
    "olmo2-13b": "olmo2-1b",
    "qwen3-14b": "qwen3-1.7b",
}


def preset_config(name: str) -> PretrainedConfig:
    """The transformers config of a preset (no EOS: random models decode to full length)."""
    if name not in PRESETS:
        raise KadError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    fields = dict(PRESETS[name])
    kind = fields.pop("model_type")
    return AutoConfig.for_model(kind, eos_token_id=None, bos_token_id=None, **fields)


def parse_pair(spec: str) -> tuple[str, str]:
    """``BASE[:PROXY]`` -> (base, proxy); the proxy defaults to the family's small model."""
    base, _, proxy = spec.partition(":")
    preset_config(base)  # an unknown name is said to be one before its proxy is asked for
    proxy = proxy or PAIRS.get(base, "")
    if not proxy:
        raise KadError(f"give the proxy preset of {base!r} as {base}:PROXY")
    preset_config(proxy)
    return base, proxy


def random_model(
    name: str, *, device: torch.device | str, dtype: torch.dtype, quantize: str = "none"
) -> PreTrainedModel:
    """A model of the preset's architecture with random weights (the architecture's own
    initialisation), made directly on ``device``; on "meta" no memory is used.

    ``quantize`` ("int8", "int4"): the decoder projections quantized (`kad.fast.quant`). The
    model is then made on the meta device and each decoder layer made on ``device``,
    initialised and quantized in turn, so a 70B model in int8 never holds its float weights."""
    config = preset_config(name)
    if quantize == "none":
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model.eval()
    from kad.fast.quant import check_quantizable, quantize_layer

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    check_quantizable(model, quantize)
    decoder = model.model
    layers, decoder.layers = decoder.layers, torch.nn.ModuleList()
    model.to_empty(device=device)  # embeddings, norm, head: initialised below
    model.tie_weights()  # to_empty unties a tied head
    with torch.device(device):
        decoder.rotary_emb = type(decoder.rotary_emb)(config=model.config)  # its own tables
    _initialise(model, model)
    for block in layers:
        block.to_empty(device=device)
        _initialise(model, block)
        quantize_layer(block, quantize)
        decoder.layers.append(block)
    return model.eval()


@torch.no_grad()
def _initialise(model: PreTrainedModel, part: torch.nn.Module) -> None:
    """The architecture's own initialisation of the modules of ``part``."""
    for module in part.modules():
        model._init_weights(module)


def parameter_count(model: PreTrainedModel) -> int:
    """Distinct parameters (tied embeddings counted once), a quantized projection's weights and
    bias among them."""
    from kad.fast.quant import QuantizedLinear

    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    return sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features + (0 if m.packed.bias is None else m.out_features)
        for m in quantized
    )


def random_aligner(
    spec: str,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int = 0,
    tensor_parallel: int | None = None,
    quantize: dict[str, str] | None = None,
    **runtime: Any,
) -> Any:
    """A `kad.Aligner` over a random-weight preset pair (``"llama3-8b"`` or ``"base:proxy"``)
    that reads and writes text through the built-in pair's tokenizer (its vocabulary is the
    shared one): the real models' shapes, bytes and speed behind a server, for load tests.
    ``runtime``: the Aligner's pool settings (max_rows, max_context, memory_fraction).
    ``tensor_parallel``: the base sharded over N ranks, as in `kad.Aligner.from_pretrained`
    (every rank makes the same weights from ``seed``). ``quantize``: per role, as
    `Aligner.from_pretrained`'s (made layer by layer, see `random_model`)."""
    from kad.fast.quant import parse_quantize
    from kad.parallel.group import check_shardable, check_size, launch

    formats = parse_quantize(quantize)
    if "proxy_base" in formats:
        raise KadError("a random-weight pair has no proxy_base to quantize")
    base_name, proxy_name = parse_pair(spec)
    device = torch.device(device)
    n = check_size(tensor_parallel, device)
    build = functools.partial(
        _random_rank, base_name, proxy_name, dtype=dtype, seed=seed, formats=formats
    )
    if n == 1:
        return build(None, device=device, **runtime)
    if formats:
        raise KadError("tensor parallelism does not shard quantized models yet: drop quantize")
    check_shardable(preset_config(base_name), n, base_name)
    return launch(n, device, functools.partial(build, **runtime))


def _random_rank(
    base_name: str,
    proxy_name: str,
    tp: Any,
    *,
    dtype: torch.dtype,
    seed: int,
    formats: dict[str, str] | None = None,
    device: torch.device | None = None,
    base_device: torch.device | None = None,
    **runtime: Any,
) -> Any:
    """The aligner of `random_aligner` on ``device``, or on a tensor-parallel rank ``tp``.
    ``base_device``: where the base's random weights are drawn (default: the CPU for ranks on
    GPUs, each rank moving its shard; else ``device``); a single process moves the base to
    ``device`` (so a reference can draw the very weights the ranks draw)."""
    from transformers import AutoTokenizer

    from kad.aligner import Aligner, Member
    from kad.models import PromptRenderer
    from kad.world import BASE_TEMPLATE, builtin_paths

    formats = formats or {}
    if tp is not None:
        device = tp.device
    assert device is not None
    if base_device is None:
        base_device = torch.device("cpu") if tp is not None and device.type == "cuda" else device
    tokenizer = AutoTokenizer.from_pretrained(str(builtin_paths().proxy))
    torch.manual_seed(seed)
    base = random_model(
        base_name, device=base_device, dtype=dtype, quantize=formats.get("base", "none")
    )
    proxy = random_model(
        proxy_name, device=device, dtype=dtype, quantize=formats.get("proxy", "none")
    )
    if tp is None:
        base = base.to(device)
    return Aligner(
        Member(base, tokenizer, PromptRenderer(tokenizer, False, BASE_TEMPLATE)),
        Member(proxy, tokenizer, PromptRenderer(tokenizer, True, None)),
        parallel=tp,
        **runtime,
    )
