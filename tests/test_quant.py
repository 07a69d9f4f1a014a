"""Weight-only quantization (`kad.fast.quant`) on CPU: each format against its float reference,
the runtime's invariants on quantized models, bad input, memory accounting, the 70B preset."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

import kad
import kad.fast.quant as quant
from kad.fast import presets
from kad.fast.llama import Linear, layer_forward
from kad.fast.quant import (
    FORMATS,
    Int4Linear,
    Int8Linear,
    dequantize,
    format_of,
    parse_quantize,
    quantize_model,
    quantize_weight,
    quantized_linear,
    weight_bytes,
)
from kad.fast.roofline import model_bytes
from kad.fast.runner import StaticRunner
from kad.options import QUANT_FORMATS
from kad.runtime.pool import plan_pool

PROMPTS = ["Tom has 3 apples", "Hello world", "Question: what is 7 times 6?"]
# output relative error of one projection on Gaussian weights and inputs, at most
TOLERANCE = {"int8": 0.02, "int4": 0.15}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tiny(kind: str = "llama", seed: int = 1) -> torch.nn.Module:
    """A float32 model whose projections have 128 and 256 inputs (one and two int4 groups)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        kind,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def quantized_aligner(tiny_dirs):
    return kad.Aligner.from_pretrained(
        str(tiny_dirs.base), str(tiny_dirs.proxy), quantize={"base": "int8", "proxy": "int4"}
    )


# ----- the formats
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_projection_is_near_its_float_and_equal_to_its_dequantized_weight(fmt):
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 256), torch.randn(96)
    x = torch.randn(3, 5, 256)
    layer = quantize_weight(weight, fmt, bias)
    y = quantized_linear(x, layer)
    assert y.shape == (3, 5, 96)
    # the formula: the product is that of the dequantized weight
    assert torch.allclose(y, x @ dequantize(layer).t() + bias, atol=1e-4)
    assert relative_error(y, x @ weight.t() + bias) < TOLERANCE[fmt]
    assert relative_error(dequantize(layer), weight) < TOLERANCE[fmt]


def test_the_formats_store_what_they_say():
    torch.manual_seed(0)
    weight = torch.randn(8, 256)
    q8 = quantize_weight(weight, "int8")
    assert isinstance(q8, Int8Linear) and q8.codes.dtype == torch.int8
    assert q8.codes.abs().amax(dim=1).eq(127).all()  # symmetric, per output channel
    assert torch.allclose(q8.scale, weight.abs().amax(dim=1) / 127)
    q4 = quantize_weight(weight, "int4")
    assert isinstance(q4, Int4Linear) and q4.group == 128
    assert q4.codes.shape == (8, 128) and q4.scale_zero.shape == (2, 8, 2)
    # w ≈ s · (q − 8) + z per group: the group's min and max are (nearly) codes 0 and 15
    scale, zero = q4.scale_zero[0, 0]
    group = weight[0, :128]
    assert torch.isclose(zero - 8 * scale, group.min(), atol=1e-5)
    assert torch.isclose(zero + 7 * scale, group.max(), atol=1e-5)
    assert quantize_weight(torch.randn(4, 64), "int4").group == 64  # a shorter row: one group
    with pytest.raises(kad.KadError, match="groups of 128"):
        quantize_weight(torch.randn(4, 192), "int4")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_quantized_layer_and_model_against_their_float_reference(fmt):
    """The compact layer of a quantized model: equal to the same layer over the dequantized
    weights, near the float layer; the logits likewise."""
    model = tiny("qwen2")  # biased qkv
    ref = copy.deepcopy(model)
    quantize_model(model, fmt)
    assert format_of(model) == fmt and format_of(ref) == "none"
    quant_net, ref_net = StaticRunner(model, 300, 2, 16).net, StaticRunner(ref, 300, 2, 16).net
    dequant_layer = quant_net.layers[0]._replace(
        **{
            name: Linear(dequantize(q), q.bias)
            for name, q in quant_net.layers[0]._asdict().items()
            if isinstance(q, (Int8Linear, Int4Linear))
        }
    )
    torch.manual_seed(2)
    x = torch.randn(2, 4, 128)
    outs = []
    runner = StaticRunner(ref, 300, 2, 16)
    for layer in (quant_net.layers[0], dequant_layer, ref_net.layers[0]):
        cols = torch.arange(4).expand(2, 4)
        cos, sin = runner.cos[cols].unsqueeze(1), runner.sin[cols].unsqueeze(1)
        mask = (runner.columns <= cols.unsqueeze(-1))[:, None, None]
        args = (runner.k[0], runner.v[0], cols, cos, sin, mask, quant_net.arch)
        outs.append(layer_forward(x, layer, *args) - x)  # the layer's own contribution
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert relative_error(outs[0], outs[2]) < TOLERANCE[fmt]
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        logits, ref_logits = model(ids).logits, ref(ids).logits  # transformers' own forward
        static = StaticRunner(model, 300, 2, 16).forward(0, ids)
    assert relative_error(logits, ref_logits) < 2 * TOLERANCE[fmt]
    assert torch.allclose(static, torch.log_softmax(logits, -1), atol=1e-4)


# ----- the runtime's invariants hold on quantized models
def test_speculative_greedy_is_plain_greedy_and_a_row_alone_is_batched(quantized_aligner):
    assert format_of(quantized_aligner.members["base"].model) == "int8"
    assert format_of(quantized_aligner.members["proxy"].model) == "int4"
    alone = [quantized_aligner.generate(p, max_new_tokens=10)[0].token_ids for p in PROMPTS]
    for gamma in (None, 1, 3, 6):
        batch = quantized_aligner.generate(PROMPTS, max_new_tokens=10, speculative=gamma)
        assert [g.token_ids for g in batch] == alone, f"γ={gamma}"
    base = kad.BaseOnly()
    plain = quantized_aligner.generate(PROMPTS, rule=base, max_new_tokens=10)
    spec = quantized_aligner.generate(PROMPTS, rule=base, max_new_tokens=10, speculative=4)
    assert [g.token_ids for g in spec] == [g.token_ids for g in plain]


def test_quantization_changes_the_distribution(tiny_dirs, quantized_aligner):
    """Quantized models decode their own distributions: p or q* change (here the scores)."""
    plain = kad.Aligner.from_pretrained(str(tiny_dirs.base), str(tiny_dirs.proxy))
    prompt, text = PROMPTS[0], " so he has 8 apples."
    a, b = plain.score(prompt, text)[0], quantized_aligner.score(prompt, text)[0]
    assert a != b and abs(a - b) < 0.2 * abs(a)


# ----- bad input
def test_bad_formats_and_roles_are_one_line_errors(tiny_dirs):
    assert parse_quantize({"base": "int8", "proxy": "none"}) == {"base": "int8"}
    assert parse_quantize(None) == {} and FORMATS == QUANT_FORMATS
    for bad, words in (
        ({"base": "int3"}, "none, int8, int4"),
        ({"drafter": "int8"}, "base, proxy, proxy_base"),
        ("int8", "a dict"),
    ):
        with pytest.raises(kad.KadError, match=words) as err:
            parse_quantize(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(kad.KadError, match="none, int8, int4"):
        kad.Aligner.from_pretrained(
            str(tiny_dirs.base), str(tiny_dirs.proxy), quantize={"base": "fp8"}
        )
    # the proxy base is GPT-2: the compact forward cannot run it
    with pytest.raises(kad.KadError, match=r"proxy_base model.*compact forward.*gpt2"):
        kad.Aligner.from_pretrained(
            str(tiny_dirs.base),
            str(tiny_dirs.proxy),
            str(tiny_dirs.proxy_base),
            quantize={"proxy_base": "int8"},
        )
    model = tiny()
    quantize_model(model, "int8")
    with pytest.raises(kad.KadError, match="already quantized"):
        quantize_model(model, "int4")


def test_the_cli_options_name_the_choices(tiny_dirs):
    from kad.cli import app

    base, proxy = str(tiny_dirs.base), str(tiny_dirs.proxy)
    args = ["generate", "hi", "--base", base, "--proxy", proxy, "--max-new-tokens", "3"]
    bad = CliRunner().invoke(app, [*args, "--quantize-base", "int3"])
    said = " ".join(bad.output.replace("│", " ").split())  # unwrapped from the error box
    assert bad.exit_code == 2 and "'int3' is not one of 'none', 'int8', 'int4'" in said
    good = CliRunner().invoke(app, [*args, "--quantize-base", "int8", "--json"])
    assert good.exit_code == 0, good.output
    helps = [CliRunner().invoke(app, [c, "--help"]).output for c in ("generate", "serve", "bench")]
    helps.append(CliRunner().invoke(app, ["eval", "--help"]).output)
    assert all("--quantize-base" in h and "--quantize-proxy" in h for h in helps)


# ----- memory
def test_quantized_bytes_count_in_the_roofline_and_the_pool(monkeypatch):
    model = tiny()
    float_bytes = weight_bytes(model)
    quantized = {fmt: quantize_model(tiny(), fmt) for fmt in ("int8", "int4")}
    linear = sum(
        m.weight.numel() for m in model.model.layers.modules() if hasattr(m, "out_features")
    )
    rest = float_bytes - 4 * linear  # embeddings, head and norms stay float32
    groups = linear // 128
    assert weight_bytes(quantized["int8"]) == rest + linear + 4 * sum(
        m.out_features for m in model.model.layers.modules() if hasattr(m, "out_features")
    )
    assert weight_bytes(quantized["int4"]) == rest + linear // 2 + groups * 2 * 4
    assert model_bytes(quantized["int8"]).weights == weight_bytes(quantized["int8"]) - 300 * 128 * 4
    assert presets.parameter_count(quantized["int4"]) == presets.parameter_count(model)
    # memory_fraction of the host: the weights are taken off first, at their quantized bytes
    import kad.runtime.pool as pool

    per_row = 64 * 2 * 2 * 2 * 32 * 4  # tokens × K, V × layers × KV heads × head dim × 4 B
    monkeypatch.setattr(pool, "_host_memory", lambda: float_bytes + 10 * per_row)
    contexts = {"base": 64}
    rows = {
        name: plan_pool({"base": m}, contexts, max_context=64, memory_fraction=1.0).rows
        for name, m in (("float", model), *quantized.items())
    }
    assert rows["float"] == 10
    assert rows["int8"] == 10 + (float_bytes - weight_bytes(quantized["int8"])) // per_row
    assert rows["float"] < rows["int8"] < rows["int4"]


def test_the_70b_preset_is_made_layer_by_layer_and_quantized(monkeypatch):
    meta = presets.random_model("llama3-70b", device="meta", dtype=torch.bfloat16)
    assert presets.parameter_count(meta) / 1e9 == pytest.approx(70.55, rel=0.01)
    assert presets.PAIRS["llama3-70b"] == "llama3.2-1b"
    shapes = dict(presets.PRESETS["llama3-70b"], num_hidden_layers=3, vocab_size=512)
    shapes.update(
        hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2
    )
    monkeypatch.setitem(presets.PRESETS, "small-70b", shapes)
    made = []  # per quantized layer: the float projections on the device, layers still on meta
    original = quant.quantize_layer

    def watched(block, fmt):
        made.append(sum(p.device.type == "cpu" and p.ndim == 2 for p in block.parameters()))
        original(block, fmt)

    monkeypatch.setattr(quant, "quantize_layer", watched)
    model = presets.random_model("small-70b", device="cpu", dtype=torch.float32, quantize="int4")
    assert made == [7, 7, 7]  # one layer's 7 float projections at a time
    assert format_of(model) == "int4" and not any(p.is_meta for p in model.parameters())
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.1)  # initialised
    plain = presets.random_model("small-70b", device="cpu", dtype=torch.float32)
    assert torch.equal(model.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_bench_and_eval_carry_the_formats(tiny_dirs, tmp_path):
    from kad.bench.loading import load_pair
    from kad.eval.commands import run_record
    from kad.eval.runner import check_run_file

    pair = load_pair(
        str(tiny_dirs.base), str(tiny_dirs.proxy), None, 0, torch.device("cpu"), torch.float32,
        {"proxy": "int8"},
    )  # fmt: skip
    assert (format_of(pair.base), format_of(pair.proxy)) == ("none", "int8")
    plain = run_record("b", "p", None, kad.Dual(), {}, None)
    quantized = run_record("b", "p", None, kad.Dual(), {}, None, {"base": "int4"})
    assert "quantize" not in plain and quantized["quantize"] == {"base": "int4"}
    check_run_file(tmp_path, plain)
    with pytest.raises(kad.KadError, match="quantize"):
        check_run_file(tmp_path, quantized)  # a folder holds one setting
