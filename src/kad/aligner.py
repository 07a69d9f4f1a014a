"""`Aligner`: a base model, its aligned proxy (and optionally the proxy's base), ready to decode."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kad.errors import ContextLengthError, KadError, PromptError
from kad.models import (
    Prompt,
    PromptPart,
    PromptRenderer,
    Raw,
    Template,
    context_length,
    eos_ids,
    load_causal_lm,
    resolve_device,
    resolve_dtype,
    shared_vocab_size,
)
from kad.outputs import Generation
from kad.prompt import check_text
from kad.rules import Dual, Rule, make_rule
from kad.runtime.runner import log_probs
from kad.runtime.scheduler import PREFILL_CHUNK, Runtime, Session
from kad.runtime.sequence import Request
from kad.sampling import Warp, check_seed, row_seed
from kad.speculative import parse_speculative

if TYPE_CHECKING:
    from kad.parallel.group import TensorParallel

PromptLike = str | Raw | Prompt | Sequence[dict]


@dataclass
class Member:
    """One model of the family with the way it renders prompts."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    renderer: PromptRenderer

    @property
    def context(self) -> int:
        return context_length(self.model)


class Aligner:
    """A base model p steered by an aligned proxy q* that shares its vocabulary.

    ``proxy_base`` (q, the proxy before alignment) is needed only by the implicit-reward rule.
    Decoding runs on one continuous-batching `kad.runtime.scheduler.Runtime`, made on first use:
    one KV pool per model of ``max_rows`` slots × ``max_context`` tokens (sized from a memory
    budget when not given, see `kad.runtime.pool.plan_pool`). ``fast``: the compact forward of
    `kad.fast` (None: for the architectures it supports; False: transformers' forward).
    ``parallel``: this process's rank of a tensor-parallel run (`kad.parallel`; made by
    ``from_pretrained(..., tensor_parallel=N)``): the base is sharded over the ranks.
    """

    def __init__(
        self,
        base: Member,
        proxy: Member,
        proxy_base: Member | None = None,
        *,
        fast: bool | None = None,
        max_rows: int | None = None,
        max_context: int | None = None,
        memory_fraction: float | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        parallel: TensorParallel | None = None,
    ) -> None:
        self.parallel = parallel
        self.members = {"base": base, "proxy": proxy}
        if proxy_base is not None:
            self.members["proxy_base"] = proxy_base
        self.fast = fast
        self.pool_settings = {
            "max_rows": max_rows,
            "max_context": max_context,
            "memory_fraction": memory_fraction,
        }
        if (
            isinstance(prefill_chunk, bool)
            or not isinstance(prefill_chunk, int)
            or (prefill_chunk < 1)
        ):
            raise KadError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk
        self._runtime: Runtime | None = None
        self.vocab_size = shared_vocab_size(
            [m.tokenizer for m in self.members.values()],
            [m.model.get_output_embeddings().weight.shape[0] for m in self.members.values()],
        )
        proxy_eos = eos_ids(proxy.model, proxy.tokenizer)
        self.eos_ids = {
            i for i in eos_ids(base.model, base.tokenizer) | proxy_eos if i < self.vocab_size
        }
        if not self.eos_ids & proxy_eos:
            warnings.warn(
                "none of the proxy's EOS ids lies in the shared vocabulary: generations will "
                "stop only at max_new_tokens or a stop string",
                stacklevel=2,
            )

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike,
        proxy: str | os.PathLike,
        proxy_base: str | os.PathLike | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        device_map: str | dict | None = None,
        base_template: Template = None,
        proxy_template: Template = None,
        fast: bool | None = None,
        max_rows: int | None = None,
        max_context: int | None = None,
        memory_fraction: float | None = None,
        tensor_parallel: int | None = None,
        quantize: dict[str, str] | None = None,
    ) -> Aligner:
        """Load the models from local directories, GGUF files, or Hub ids (online only).

        dtype None: float32 on CPU, bfloat16 on a GPU. Templates: None (the proxy uses its chat
        template, the base raw text), a string with ``{prompt}``, or a callable. fast: the
        compact forward of `kad.fast` (None: for Llama, Qwen2/3 and OLMo2 models). max_rows,
        max_context, memory_fraction: the runtime's KV pool (see the class docstring).
        tensor_parallel: shard the base over N ranks (`kad.parallel`, README "Tensor
        parallelism"); under torchrun only rank 0 returns, otherwise this process is rank 0 and
        spawns the others. N is checked against the GPUs and the base's heads before loading.
        quantize: weight-only quantization per role, e.g. ``{"base": "int8", "proxy": "int4"}``
        (`kad.fast.quant`; it changes that model's distribution). A quantized model is loaded
        on the host and moved to the device one quantized layer at a time.
        """
        from kad.fast.quant import parse_quantize, quantize_model

        formats = parse_quantize(quantize)
        if formats and device_map is not None:
            raise KadError("quantize and device_map do not go together: quantize on one device")
        if "proxy_base" in formats and proxy_base is None:
            raise KadError("quantize names the proxy_base, but no proxy_base is loaded")
        target = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, target)
        from kad.parallel.group import check_model_shardable, check_size, launch

        n = check_size(tensor_parallel, target)
        if n > 1:
            if device_map is not None:
                raise KadError("give tensor_parallel or device_map, not both")
            if fast is False:
                raise KadError("tensor parallelism runs on the fast path: drop fast=False")
            if formats:
                raise KadError(
                    "tensor parallelism does not shard quantized models yet: drop quantize"
                )
            check_model_shardable(base, n)
            build = functools.partial(
                _parallel_rank,
                str(base),
                str(proxy),
                None if proxy_base is None else str(proxy_base),
                dtype=torch_dtype,
                max_rows=max_rows,
                max_context=max_context,
                memory_fraction=memory_fraction,
            )
            aligner = launch(n, target, build)
            for role, template in (("base", base_template), ("proxy", proxy_template)):
                member = aligner.members[role]
                member.renderer = PromptRenderer(member.tokenizer, role == "proxy", template)
            if "proxy_base" in aligner.members:
                member = aligner.members["proxy_base"]
                member.renderer = PromptRenderer(member.tokenizer, True, proxy_template)
            return aligner

        loaded: dict[tuple[str, str], tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}

        def load(spec, role: str, chat: bool, template: Template) -> Member:
            fmt = formats.get(role, "none")
            key = (str(spec), fmt)
            if key not in loaded:  # one model in two roles (and one format) is loaded once
                if fmt == "none":
                    loaded[key] = load_causal_lm(
                        spec, dtype=torch_dtype, device=target, device_map=device_map
                    )
                else:
                    model, tokenizer = load_causal_lm(
                        spec, dtype=torch_dtype, device=torch.device("cpu")
                    )
                    try:
                        quantize_model(model, fmt, target)
                    except KadError as err:
                        raise KadError(f"the {role} model {str(spec)!r}: {err}") from None
                    loaded[key] = (model, tokenizer)
            model, tokenizer = loaded[key]
            return Member(model, tokenizer, PromptRenderer(tokenizer, chat, template))

        members = [
            load(base, "base", False, base_template),
            load(proxy, "proxy", True, proxy_template),
        ]
        if proxy_base is not None:
            members.append(load(proxy_base, "proxy_base", True, proxy_template))
        return cls(
            *members,
            fast=fast,
            max_rows=max_rows,
            max_context=max_context,
            memory_fraction=memory_fraction,
        )

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer that decodes the shared continuation (the proxy's)."""
        return self.members["proxy"].tokenizer

    def encode_prompts(self, prompts: Sequence[PromptLike]) -> dict[str, list[list[int]]]:
        """Token ids of every prompt as each model renders it. q (proxy_base) reads the proxy's."""
        ids: dict[str, list[list[int]]] = {role: [] for role in self.members}
        for prompt in prompts:
            if isinstance(prompt, Prompt):
                parts = {
                    "base": prompt.base if prompt.base is not None else prompt.proxy,
                    "proxy": prompt.proxy if prompt.proxy is not None else prompt.base,
                }
            else:
                parts = {"base": prompt, "proxy": prompt}
            for role in ("base", "proxy"):
                ids[role].append(self.members[role].renderer.encode(parts[role]))
            if "proxy_base" in ids:
                ids["proxy_base"].append(ids["proxy"][-1])
        for role, rows in ids.items():
            context = self.members[role].context
            for i, row in enumerate(rows):
                if len(row) >= context:
                    raise ContextLengthError(
                        f"prompt {i} is {len(row)} tokens for the {role} model, whose context "
                        f"holds {context}: shorten it"
                    )
        return ids

    @property
    def runtime(self) -> Runtime:
        """The continuous-batching runtime over this family (its KV pools are made once); a
        `kad.parallel.runtime.ParallelRuntime` under tensor parallelism."""
        if self._runtime is None:
            kind: Any = Runtime
            extra: dict[str, Any] = {}
            if self.parallel is not None:
                from kad.parallel.runtime import ParallelRuntime

                kind, extra = ParallelRuntime, {"tp": self.parallel}
            self._runtime = kind(
                {role: m.model for role, m in self.members.items()},
                {role: m.context for role, m in self.members.items()},
                self.vocab_size,
                self.tokenizer,
                self.eos_ids,
                fast=self.fast,
                prefill_chunk=self.prefill_chunk,
                **self.pool_settings,
                **extra,
            )
        return self._runtime

    def follow(self) -> None:
        """A follower rank of a tensor-parallel run: follow rank 0's runtime until it stops."""
        self.runtime.follow()  # type: ignore[attr-defined]

    def close(self) -> None:
        """Under tensor parallelism: stop the follower ranks and leave the process group (at
        exit if not before). Otherwise nothing."""
        if self.parallel is not None and self.parallel.driver:
            from kad.parallel.runtime import STOP

            # a follower may be gone already (a SIGTERM to the whole group): leave anyway
            with contextlib.suppress(RuntimeError):
                self.parallel.broadcast(STOP)
            self.parallel.close()
            self.parallel = None

    def _check_rule(self, rule: Rule | str) -> Rule:
        if isinstance(rule, str):
            rule = make_rule(rule)
        if not isinstance(rule, Rule):
            raise KadError(f"rule must be a kad rule such as kad.Dual(), got {rule!r}")
        if rule.needs_proxy_base and "proxy_base" not in self.members:
            raise KadError(
                f"the {rule.name} rule needs the proxy's unaligned base model: "
                "load it with proxy_base= (CLI: --proxy-base)"
            )
        return rule

    def start(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        rule: Rule | str | Sequence[Rule | str] | None = None,
        max_new_tokens: int | Sequence[int] = 256,
        temperature: float | Sequence[float] = 0.0,
        top_p: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 0,
        seed: int | Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
        speculative: int | str | None = None,
        *,
        prompt_ids: dict[str, list[list[int]]] | None = None,
    ) -> Session:
        """Queue prompts in the runtime and return their `Session` (see `generate`).

        ``rule``, ``max_new_tokens``, ``temperature``, ``top_p``, ``top_k`` and ``seed`` may be
        one value per prompt: rows with different settings share one batch. ``prompt_ids``:
        the prompts as `encode_prompts` already tokenized them (the server's path)."""
        batch = _as_batch(prompts)
        if not batch:
            raise PromptError("no prompts were given")
        n = len(batch)
        rules = [self._check_rule(Dual() if r is None else r) for r in _rows(rule, n, "rule")]
        warps = [
            Warp(temperature=t, top_k=k, top_p=p)
            for t, k, p in zip(
                _rows(temperature, n, "temperature"),
                _rows(top_k, n, "top_k"),
                _rows(top_p, n, "top_p"),
                strict=True,
            )
        ]
        limits = _budgets(max_new_tokens, n)
        stops = tuple(s for s in ([stop] if isinstance(stop, str) else list(stop or [])))
        for text in stops:
            if not isinstance(text, str) or not text:
                raise KadError(f"a stop string must be non-empty text, got {text!r}")
        seeds = _seeds(seed, n)
        spec = parse_speculative(speculative)
        ids = self.encode_prompts(batch) if prompt_ids is None else prompt_ids
        runtime = self.runtime
        requests = []
        for i in range(n):
            row_ids = {role: rows[i] for role, rows in ids.items()}
            budget = runtime.budget(
                {r: v for r, v in row_ids.items() if r in runtime.runners}, limits[i]
            )
            requests.append(Request(row_ids, rules[i], warps[i], seeds[i], budget, stops, spec))
        return Session(runtime, [runtime.add(r) for r in requests])

    def generate(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        rule: Rule | str | Sequence[Rule | str] | None = None,
        max_new_tokens: int | Sequence[int] = 256,
        temperature: float | Sequence[float] = 0.0,
        top_p: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 0,
        seed: int | Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
        speculative: int | str | None = None,
        progress: bool = False,
    ) -> list[Generation]:
        """Decode prompts under ``rule`` (default: KAD dual, λ = 0.4).

        A prompt is user text (each model renders it its own way), a list of chat messages, or a
        `Prompt` with one rendering per model. Any number of prompts streams through the
        runtime's ``max_rows`` slots. temperature 0 is greedy; ``seed``: one int (row i draws
        from its own stream, derived from (seed, i); row 0 equals the prompt run alone with that
        seed), or one per prompt. ``speculative``: None (plain), a draft length γ ≥ 1, or
        "auto". Per-prompt lists are accepted as in `start`. Returns one `Generation` per prompt.
        """
        session = self.start(
            prompts, rule, max_new_tokens, temperature, top_p, top_k, seed, stop, speculative
        )
        total = sum(seq.request.max_new_tokens for seq in session.sequences)
        with torch.inference_mode(), _progress(progress) as bar:
            task = bar.add_task("decoding", total=total) if bar else None
            while not session.done:
                session.step()
                if bar is not None:
                    done = sum(
                        seq.request.max_new_tokens if seq.finished else len(seq.token_ids)
                        for seq in session.sequences
                    )
                    bar.update(task, completed=done)
        return session.results()

    def score(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        continuations: str | Sequence[str],
        rule: Rule | str | None = None,
    ) -> list[float]:
        """Teacher-forced log π(continuation | prompt), summed over the continuation's tokens.

        The continuation is tokenized once with the shared vocabulary (no special tokens) and
        scored position by position under the unwarped mixture π of ``rule``: each model reads
        its prompt and the continuation in one forward (no cache).
        """
        if self.parallel is not None:
            raise KadError("score does not run under tensor parallelism yet")
        batch = _as_batch(prompts)
        conts = [continuations] if isinstance(continuations, str) else list(continuations)
        if not batch:
            raise PromptError("no prompts were given")
        if len(batch) != len(conts):
            raise KadError(f"{len(batch)} prompts but {len(conts)} continuations")
        rule = self._check_rule(Dual() if rule is None else rule)
        for i, text in enumerate(conts):
            if not isinstance(text, str):
                raise KadError(f"continuation {i} must be text, got {text!r}")
            check_text(text, f"continuation {i}")
        cont_ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in conts]
        if any(not ids for ids in cont_ids):
            raise KadError("a continuation to score is empty")
        roles = [r for r in self.members if r != "proxy_base" or rule.needs_proxy_base]
        scores = []
        with torch.inference_mode():
            prompt_ids = self.encode_prompts(batch)
            for i, cont in enumerate(cont_ids):
                dists = {}
                for role in roles:
                    member, row = self.members[role], prompt_ids[role][i]
                    if len(row) + len(cont) > member.context:
                        raise ContextLengthError(
                            f"prompt {i} with its continuation is over the {role} model's "
                            f"context of {member.context} tokens"
                        )
                    device = member.model.get_input_embeddings().weight.device
                    ids = torch.tensor([row + cont[:-1]], device=device)
                    logits = member.model(input_ids=ids).logits[0, len(row) - 1 :]  # [n, V]
                    dists[role] = log_probs(logits[:, : self.vocab_size]).exp().cpu()
                pi = rule.mix(dists["base"], dists["proxy"], dists.get("proxy_base")).pi
                target = torch.tensor(cont).unsqueeze(-1)
                scores.append(torch.log(pi.gather(-1, target)).sum().item())
        return scores


def _parallel_rank(
    base: str,
    proxy: str,
    proxy_base: str | None,
    tp: TensorParallel,
    *,
    dtype: torch.dtype,
    **pool: Any,
) -> Aligner:
    """One rank's aligner of a tensor-parallel run: the base loaded on the CPU when the ranks
    use GPUs (each rank moves only its shard to its GPU), the proxies on the rank's device.
    Prompt templates are rank 0's business (`from_pretrained` sets them)."""
    base_device = torch.device("cpu") if tp.device.type == "cuda" else tp.device
    loaded: dict[tuple[str, str], tuple[PreTrainedModel, PreTrainedTokenizerBase]] = {}

    def load(spec: str, device: torch.device, chat: bool) -> Member:
        key = (spec, str(device))
        if key not in loaded:
            loaded[key] = load_causal_lm(spec, dtype=dtype, device=device)
        model, tokenizer = loaded[key]
        return Member(model, tokenizer, PromptRenderer(tokenizer, chat, None))

    members = [load(base, base_device, False), load(proxy, tp.device, True)]
    if proxy_base is not None:
        members.append(load(proxy_base, tp.device, True))
    return Aligner(*members, parallel=tp, **pool)


def _as_batch(prompts: Any) -> list[PromptLike]:
    """One prompt (str, Raw, Prompt or a list of messages) or a list of them -> a list."""
    if isinstance(prompts, (str, Raw, Prompt)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(m, dict) for m in prompts):
        return [prompts]  # one chat
    return prompts


def _budgets(max_new_tokens: int | Sequence[int], batch: int) -> list[int]:
    """One token budget per row, each an integer >= 1."""
    limits = [max_new_tokens] * batch if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != batch:
        raise KadError(f"{len(limits)} max_new_tokens values for {batch} prompts")
    for value in limits:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KadError(f"max_new_tokens must be an integer >= 1, got {value!r}")
    return limits


def _rows(value: Any, batch: int, name: str) -> list[Any]:
    """One value for every row, or a list of one per row."""
    if isinstance(value, (list, tuple)):
        if len(value) != batch:
            raise KadError(f"{len(value)} {name} values for {batch} prompts")
        return list(value)
    return [value] * batch


def _seeds(seed: int | Sequence[int] | None, batch: int) -> list[int]:
    """Each row's seed: random; from one int, row i's own stream (`row_seed`); or as given."""
    if seed is None:
        return [random.randrange(2**62) for _ in range(batch)]
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise KadError(f"{len(seed)} seeds for {batch} prompts")
        return [check_seed(s) for s in seed]
    return [row_seed(check_seed(seed), i) for i in range(batch)]


def _progress(enabled: bool):
    """A rich progress bar over generated tokens, or a null context."""
    if not enabled:
        from contextlib import nullcontext

        return nullcontext(None)
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TimeElapsedColumn(),
        transient=True,
    )


__all__ = ["Aligner", "Member", "PromptPart"]
