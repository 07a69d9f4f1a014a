"""Train the world's three models from scratch: ``python -m kad.world.train --out DIR``.

1. Generate the web corpus and the instruction data (``kad.world.generator``), seeded.
2. Train the shared tokenizer (``kad.world.tokenizer``).
3. Pre-train the base ``p`` and the proxy base ``q`` on the web corpus (next-token loss).
4. Fine-tune ``q`` on the instruction data into the aligned proxy ``q*`` (loss on the answer only).
5. Save ``DIR/{base,proxy_base,proxy}`` as Hugging Face model directories (LlamaForCausalLM,
   safetensors, float16 weights that load as float32) and ``DIR/metrics.json`` (losses and the
   premise probe of ``kad.world.probe`` on dev problems).

Runs on CPU (slowly) or on a GPU (``--device cuda``, bfloat16 autocast).
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from tokenizers import Tokenizer
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from kad.world import generator, probe
from kad.world.tokenizer import (
    END_OF_TEXT,
    END_OF_TURN,
    PAD,
    build_tokenizer,
    render_turn,
    save_tokenizer,
)

IGNORE = -100
_DOCS_PER_CHUNK = 50_000


@dataclass(frozen=True)
class Shape:
    """A LlamaForCausalLM's size (tied embeddings, no grouped-query attention)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int

    def non_embedding_params(self) -> int:
        per_layer = 4 * self.hidden**2 + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.layers * per_layer + self.hidden


BASE = Shape(hidden=160, layers=4, heads=5, intermediate=432)
PROXY = Shape(hidden=96, layers=2, heads=4, intermediate=256)


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights (with the code)."""

    seed: int = 0
    web_docs: int = 2_000_000
    instruction_examples: int = 100_000
    tokenizer_docs: int = 50_000
    vocab_size: int = 1024
    seq_len: int = 256
    batch: int = 256
    base_steps: int = 4000
    proxy_steps: int = 4000
    sft_steps: int = 200
    base_lr: float = 1e-3
    proxy_lr: float = 2e-3
    sft_lr: float = 5e-4
    probe_problems: int = 200


def _web_chunk(args: tuple[int, int]) -> list[str]:
    seed, n = args
    return generator.web_documents(seed, n)


def web_corpus(seed: int, n: int, workers: int) -> list[str]:
    """n web documents, in chunks of 50k with seeds derived from ``seed`` (so the corpus does not
    depend on the number of workers)."""
    jobs = [
        (seed * 1_000_003 + i, min(_DOCS_PER_CHUNK, n - start))
        for i, start in enumerate(range(0, n, _DOCS_PER_CHUNK))
    ]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return [doc for chunk in pool.map(_web_chunk, jobs) for doc in chunk]


Piece = tuple[np.ndarray, np.ndarray]  # (ids [T], labels [T])


def pack(pieces: list[Piece], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy packing of whole (ids, labels) pieces into rows ``[N, seq_len]``; pieces never
    straddle rows, so each row starts at a piece's start. Padding has label IGNORE."""
    places, row, col = [], 0, 0  # where each piece starts
    for ids, _ in pieces:
        length = min(len(ids), seq_len)
        if col + length > seq_len:
            row, col = row + 1, 0
        places.append((row, col, length))
        col += length
    ids_out = np.full((row + 1, seq_len), pad_id, dtype=np.int64)
    labels_out = np.full((row + 1, seq_len), IGNORE, dtype=np.int64)
    for (ids, labels), (row, col, length) in zip(pieces, places, strict=True):
        ids_out[row, col : col + length] = ids[:length]
        labels_out[row, col : col + length] = labels[:length]
    return torch.from_numpy(ids_out), torch.from_numpy(labels_out)


def model_config(shape: Shape, tokenizer: Tokenizer, seq_len: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=2 * seq_len,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.token_to_id(END_OF_TEXT),
        pad_token_id=tokenizer.token_to_id(PAD),
    )


def train_lm(
    model: LlamaForCausalLM,
    ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    device: torch.device,
    name: str,
) -> list[float]:
    """AdamW with linear warm-up (2% of steps) and cosine decay to 10% of ``lr``; returns the
    mean loss of each 1% of the steps. ids, labels: ``[N, L]``."""
    model.to(device).train()
    ids, labels = ids.to(device), labels.to(device)
    generator_ = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8
    )
    warmup = max(1, steps // 50)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    order = torch.randperm(len(ids), generator=generator_)
    cursor, window, curve = 0, [], []
    started = time.time()
    for step in range(steps):
        if cursor + batch > len(order):
            order, cursor = torch.randperm(len(ids), generator=generator_), 0
        rows = order[cursor : cursor + batch].to(device)
        cursor += batch
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids[rows], labels=labels[rows]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        window.append(loss.detach())
        if len(window) == max(1, steps // 100) or step == steps - 1:
            curve.append(torch.stack(window).mean().item())
            window = []
            if len(curve) % 10 == 0 or step == steps - 1:
                elapsed = time.time() - started
                print(f"[{name}] step {step + 1}/{steps} loss {curve[-1]:.4f} {elapsed:.0f}s")
    model.eval()
    return curve


def save_model(
    model: LlamaForCausalLM, tokenizer: Tokenizer, directory: Path, *, chat: bool
) -> None:
    """A complete Hugging Face model directory: float16 safetensors, a config that loads them as
    float32, a generation config with the right eos, and the tokenizer files."""
    directory.mkdir(parents=True, exist_ok=True)
    eos = tokenizer.token_to_id(END_OF_TURN if chat else END_OF_TEXT)
    model.config.eos_token_id = eos
    model.generation_config = GenerationConfig(
        eos_token_id=eos, pad_token_id=tokenizer.token_to_id(PAD), do_sample=False
    )
    model.to("cpu", torch.float16).save_pretrained(str(directory))
    model.to(torch.float32)
    load_as_float32(directory)
    save_tokenizer(tokenizer, directory, chat=chat)


def load_as_float32(directory: Path) -> None:
    """Set ``dtype`` in a saved config.json to float32, so that ``from_pretrained`` upcasts the
    float16 weights by default (save_pretrained records the dtype the weights were saved in)."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = "float32"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def encode_web(tokenizer: Tokenizer, docs: list[str]) -> list[Piece]:
    """Each document followed by ``<|endoftext|>``; every token is a target."""
    eot = tokenizer.token_to_id(END_OF_TEXT)
    pieces = []
    for encoding in tokenizer.encode_batch(docs):
        ids = np.array([*encoding.ids, eot], dtype=np.int32)
        pieces.append((ids, ids))
    return pieces


def encode_instructions(tokenizer: Tokenizer, examples: list[tuple[str, str]]) -> list[Piece]:
    """Prompt (chat template up to ``<|assistant|>\\n``) and answer encoded apart, as at inference;
    the targets are the answer and ``<|end|>``."""
    end = tokenizer.token_to_id(END_OF_TURN)
    prompts = tokenizer.encode_batch([render_turn(q) for q, _ in examples])
    answers = tokenizer.encode_batch([a for _, a in examples])
    pieces = []
    for prompt, answer in zip(prompts, answers, strict=True):
        target = [*answer.ids, end]
        ids = np.array([*prompt.ids, *target], dtype=np.int32)
        labels = np.array([IGNORE] * len(prompt.ids) + target, dtype=np.int32)
        pieces.append((ids, labels))
    return pieces


@dataclass
class Data:
    """The tokenizer and the packed training rows ``[N, seq_len]`` of both stages."""

    tokenizer: Tokenizer
    web_ids: torch.Tensor
    web_labels: torch.Tensor
    sft_ids: torch.Tensor
    sft_labels: torch.Tensor


def build_data(recipe: Recipe, workers: int) -> Data:
    """Generate the web corpus and the instruction data, train the tokenizer, pack both."""
    started = time.time()
    docs = web_corpus(recipe.seed, recipe.web_docs, workers)
    examples = generator.instruction_examples(recipe.seed + 1, recipe.instruction_examples)
    sample = docs[: recipe.tokenizer_docs] + [
        render_turn(q, a) for q, a in examples[: recipe.tokenizer_docs // 10]
    ]
    tokenizer = build_tokenizer(sample, recipe.vocab_size)
    pad = tokenizer.token_to_id(PAD)
    web = pack(encode_web(tokenizer, docs), recipe.seq_len, pad)
    sft = pack(encode_instructions(tokenizer, examples), recipe.seq_len, pad)
    print(
        f"data: {len(docs)} web docs -> {tuple(web[0].shape)} rows, {len(examples)} "
        f"instruction examples -> {tuple(sft[0].shape)}; {time.time() - started:.0f}s"
    )
    return Data(tokenizer, *web, *sft)


def train_base(
    recipe: Recipe, data: Data, shape: Shape, device: torch.device
) -> tuple[LlamaForCausalLM, list[float]]:
    """Pre-train a base model of ``shape`` on the web corpus (init seeded by ``recipe.seed``)."""
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(model_config(shape, data.tokenizer, recipe.seq_len))
    curve = train_lm(
        model, data.web_ids, data.web_labels, steps=recipe.base_steps, lr=recipe.base_lr,
        batch=recipe.batch, seed=recipe.seed, device=device, name="base",
    )  # fmt: skip
    return model, curve


def train_proxies(
    recipe: Recipe, data: Data, out: Path, device: torch.device
) -> dict[str, list[float]]:
    """Pre-train the proxy base q (saved to ``out/proxy_base``), then fine-tune it on the
    instruction data into q* (saved to ``out/proxy``). Returns both loss curves."""
    torch.manual_seed(recipe.seed + 1)
    proxy = LlamaForCausalLM(model_config(PROXY, data.tokenizer, recipe.seq_len))
    curves = {}
    curves["proxy_base"] = train_lm(
        proxy, data.web_ids, data.web_labels, steps=recipe.proxy_steps, lr=recipe.proxy_lr,
        batch=recipe.batch, seed=recipe.seed + 1, device=device, name="proxy_base",
    )  # fmt: skip
    save_model(proxy, data.tokenizer, out / "proxy_base", chat=False)
    curves["proxy"] = train_lm(
        proxy, data.sft_ids, data.sft_labels, steps=recipe.sft_steps, lr=recipe.sft_lr,
        batch=recipe.batch, seed=recipe.seed + 2, device=device, name="proxy",
    )  # fmt: skip
    save_model(proxy, data.tokenizer, out / "proxy", chat=True)
    return curves


def train_world(recipe: Recipe, out: Path, device: torch.device, workers: int) -> dict:
    """Build everything under ``out``; returns the metrics also written to metrics.json."""
    started = time.time()
    data = build_data(recipe, workers)
    base, base_curve = train_base(recipe, data, BASE, device)
    save_model(base, data.tokenizer, out / "base", chat=False)
    losses = {"base": base_curve, **train_proxies(recipe, data, out, device)}
    metrics = {
        "recipe": asdict(recipe),
        "device": str(device),
        "params": {
            "base_non_embedding": BASE.non_embedding_params(),
            "proxy_non_embedding": PROXY.non_embedding_params(),
            "vocab": data.tokenizer.get_vocab_size(),
        },
        "losses": losses,
        "probe": probe.premise_probe(
            out / "base", out / "proxy", generator.heldout_problems(recipe.probe_problems, "dev")
        ),
        "seconds": round(time.time() - started),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(
    out: Annotated[Path, typer.Option(help="folder for base/, proxy_base/, proxy/")],
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    workers: Annotated[int, typer.Option(help="processes generating the corpus")] = 2,
    seed: int = Recipe.seed,
    web_docs: int = Recipe.web_docs,
    instruction_examples: int = Recipe.instruction_examples,
    batch: int = Recipe.batch,
    base_steps: int = Recipe.base_steps,
    proxy_steps: int = Recipe.proxy_steps,
    sft_steps: int = Recipe.sft_steps,
) -> None:
    """Train the built-in world (base, proxy base, aligned proxy) into OUT."""
    recipe = Recipe(
        seed=seed,
        web_docs=web_docs,
        instruction_examples=instruction_examples,
        batch=batch,
        base_steps=base_steps,
        proxy_steps=proxy_steps,
        sft_steps=sft_steps,
    )
    metrics = train_world(recipe, out, torch.device(device), workers)
    print(json.dumps(metrics["probe"], indent=2))


if __name__ == "__main__":
    typer.run(main)
