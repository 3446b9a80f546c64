"""awq-gptq-attn: v_proj's rows against the Gram of the attention-averaged inputs (value_stats.py). The Gram equals
the second moment of what transformers' attention outputs; on a block whose attention sinks on the first token the
method's objective and block output error fall below AWQ+GPTQ's; its folders stream to the same bytes as the
in-memory path, read back through the layout's reference dequantization, and are the same bytes run after run."""

import json

import pytest
import torch

from tinyserve_kernels.layout import dequantize
from tinyserve_quantize.calibration import run_block
from tinyserve_quantize.gptq import GPTQConfig, gptq_block, gptq_weight
from tinyserve_quantize.model_families import FAMILIES
from tinyserve_quantize.pipeline import run
from tinyserve_quantize.__main__ import parse_args
from tinyserve_quantize.quantizer import QuantSpec, fake_quantize
from tinyserve_quantize.value_stats import AttentionShape, ValueSite, causal_gram, value_gram
from tests.test_quantize_awq import block_inputs, tiny_model
from tests.test_quantize_gptq import correlated_inputs


HIDDEN = 192
FIRST = 8 * torch.randn(HIDDEN, generator=torch.Generator().manual_seed(99))  # every window's first token
SHARED = 3 * torch.randn(HIDDEN, generator=torch.Generator().manual_seed(98))  # a direction every other token has


def sink_inputs(B: int, S: int, seed: int) -> torch.Tensor:
    """[B, S, HIDDEN]: a fixed first token (like BOS) and correlated tokens around a shared direction."""
    x = torch.stack([correlated_inputs(S, HIDDEN, seed=seed + b) for b in range(B)]) + SHARED
    x[:, 0] = FIRST
    return x


def sinking_block(arch: str):
    """Layer 0 of the tiny model made to have an attention sink, as trained models do: in every head, one query
    dimension reads the shared direction and the matching key dimension the first token, in the head's slowest
    rotary pair (nearly position-independent), so every token attends mostly to the first. The MLP's output is
    scaled down, so the block's output error is mostly the attention's."""
    model = tiny_model(arch)
    block, kw = block_inputs(model, torch.zeros(1, 48, HIDDEN))
    with torch.no_grad():
        attn = block.self_attn
        D = attn.head_dim
        first = block.input_layernorm(FIRST[None])[0]
        shared = block.input_layernorm(sink_inputs(4, 48, seed=7)[:, 1:].reshape(-1, HIDDEN)).mean(0)
        for h in range(attn.config.num_attention_heads):
            attn.q_proj.weight[h * D + D // 2 - 1] = 5 * shared / shared.norm()
        for g in range(attn.config.num_key_value_heads):
            attn.k_proj.weight[g * D + D // 2 - 1] = 5 * first / first.norm()
        block.mlp.down_proj.weight.mul_(0.1)
    return block, kw


@pytest.mark.parametrize("B, h, S", [(1, 1, 1), (2, 3, 37), (1, 7, 130)])
def test_causal_gram_is_the_full_product(B, h, S):
    """The blocked product of causal attention weights equals sum_h a_h^T a_h computed whole, for any S."""
    scores = torch.randn(B, h, S, S, generator=torch.Generator().manual_seed(S))
    a = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    full = a.reshape(B, h * S, S).transpose(1, 2) @ a.reshape(B, h * S, S)
    torch.testing.assert_close(causal_gram(a), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@torch.no_grad()
def test_statistics_pass_stops_at_the_last_site(arch):
    """run_block(outputs=False) gathers the same statistics, bit for bit, without running down_proj."""
    block, kw = sinking_block(arch)
    family = FAMILIES[arch]
    calib = sink_inputs(6, 48, seed=3)
    attn = block.self_attn
    value = ValueSite("self_attn.q_proj", attn.q_proj, attn.k_proj, AttentionShape.of(attn))
    sites = {g.linears[0]: block.get_submodule(g.linears[0]) for g in family.groups}
    full_out, full = run_block(block, calib, kw, sites, holdout_every=4, value=value)
    calls = []
    handle = block.mlp.down_proj.register_forward_hook(lambda *a: calls.append(1))
    out, stopped = run_block(block, calib, kw, sites, holdout_every=4, value=value, outputs=False)
    handle.remove()
    assert out is None and calls == [] and full_out.shape == calib.shape
    for name, st in full.items():
        for field in ("x_mean", "H_fit", "H_val"):
            assert torch.equal(getattr(st, field), getattr(stopped[name], field)), (name, field)
    assert torch.equal(full["self_attn.q_proj"].H_value, stopped["self_attn.q_proj"].H_value)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@torch.no_grad()
def test_value_gram_is_the_second_moment_of_the_attention_output(arch):
    """For each key/value head g, W_v,g Gbar_g W_v,g^T equals the summed outer products of what transformers' own
    attention outputs for g's query heads (v_proj's bias taken out): the attention weights are recomputed right."""
    block, kw = sinking_block(arch)
    attn, S = block.self_attn, 48
    x = block.input_layernorm(sink_inputs(2, S, seed=0))
    seen = {}
    handle = attn.o_proj.register_forward_pre_hook(lambda m, a: seen.update(o=a[0]))
    attn(hidden_states=x, position_embeddings=kw["position_embeddings"], attention_mask=None)
    handle.remove()
    shape = AttentionShape.of(attn)
    gram = value_gram(x, attn.q_proj(x), attn.k_proj(x), kw["position_embeddings"], shape)
    D, group = shape.head_dim, shape.heads // shape.kv_heads
    o = seen["o"].view(2, S, shape.heads, D)
    for g in range(shape.kv_heads):
        Wv = attn.v_proj.weight[g * D : (g + 1) * D]
        out = o[:, :, g * group : (g + 1) * group]
        if attn.v_proj.bias is not None:
            out = out - attn.v_proj.bias[g * D : (g + 1) * D]
        rows = out.reshape(-1, D)
        torch.testing.assert_close(Wv @ gram[g] @ Wv.t(), rows.t() @ rows, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@torch.no_grad()
def test_value_hessian_lowers_the_objective_and_the_block_output_error(arch):
    """Where attention sinks on one token, GPTQ of v_proj against Gbar lowers the value path's error (its objective)
    far below GPTQ against the inputs' own Gram (measured: 20-35x), and awq-gptq-attn's block output error on fresh
    windows falls below AWQ+GPTQ's (measured: 0.15-0.25x)."""
    family, spec = FAMILIES[arch], QuantSpec(4, 64)
    calib, fresh = sink_inputs(16, 48, seed=10), sink_inputs(8, 48, seed=500)
    block, kw = sinking_block(arch)
    reference = block(fresh, **kw)
    value = ValueSite("self_attn.q_proj", block.self_attn.q_proj, block.self_attn.k_proj, AttentionShape.of(block.self_attn))
    sites = {g.linears[0]: block.get_submodule(g.linears[0]) for g in family.groups}
    _, stats = run_block(block, calib, kw, sites, holdout_every=4, value=value)
    st = stats["self_attn.q_proj"]
    D = value.shape.head_dim
    for g, Hbar in enumerate(st.H_value):
        W = block.self_attn.v_proj.weight[g * D : (g + 1) * D]
        errors = {}
        for name, H in (("plain", st.H_fit), ("value", Hbar)):
            dW = gptq_weight(W, H, spec).dequantized(64) - W
            errors[name] = float(torch.trace(dW @ Hbar @ dW.t()))
        rtn = fake_quantize(W, spec) - W
        assert errors["value"] < 0.2 * errors["plain"] and errors["value"] < float(torch.trace(rtn @ Hbar @ rtn.t()))

    def output_error(value_hessian: bool) -> float:
        b, _ = sinking_block(arch)
        sites = {g.linears[0]: b.get_submodule(g.linears[0]) for g in family.groups}
        v = ValueSite("self_attn.q_proj", b.self_attn.q_proj, b.self_attn.k_proj, value.shape)
        _, stats = run_block(b, calib, kw, sites, holdout_every=4, value=v)
        gptq_block(b, 0, family, spec, GPTQConfig(value_hessian=value_hessian), stats, awq=True)
        return float(((b(fresh, **kw) - reference) ** 2).mean())

    assert output_error(True) < 0.5 * output_error(False)


def test_folders_are_deterministic_and_read_back_through_the_layout(tiny_model_dir, tmp_path):
    """Two runs write the same bytes; every packed linear dequantizes (the layout's reference) to the weights the
    fake-quantized folder of the same run holds."""
    from safetensors.torch import load_file

    def quantize(out: str, *extra: str):
        run(parse_args(["--model", str(tiny_model_dir), "--out", str(tmp_path / out), "--method", "awq-gptq-attn",
                        "--group-size", "32", "--n-samples", "8", "--seqlen", "64", *extra]), log=lambda m: None, progress=False)
        return tmp_path / out

    a, b, fake = quantize("a"), quantize("b"), quantize("fake", "--fake")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    packed, dense = load_file(a / "model.safetensors"), load_file(fake / "model.safetensors")
    names = [k.removesuffix(".qweight") for k in packed if k.endswith(".qweight")]
    assert len(names) == 14 and json.loads((a / "config.json").read_text())["quantization_config"]["bits"] == 4
    for n in names:
        w = dequantize(packed[n + ".qweight"], packed[n + ".qzeros"], packed[n + ".scales"], 32)  # [K, N]
        assert torch.equal(w.t().half(), dense[n + ".weight"]), n


@pytest.mark.parametrize("method, forward", [("awq-gptq", torch.bfloat16), ("awq-gptq-attn", torch.float32)])
def test_attn_calibrates_in_fp32_where_the_search_is_bf16(tiny_model_dir, tmp_path, monkeypatch, method, forward):
    """awq-gptq-attn calibrates in fp32 even where the search is set to bf16 (an AVX-512 or AMX CPU): both forward
    passes per block (input statistics, then the quantized block's outputs) run in fp32; awq-gptq keeps bf16."""
    from dataclasses import replace

    from tinyserve_quantize import blockwise

    seen, real = [], blockwise.run_block
    monkeypatch.setattr(blockwise, "run_block", lambda block, *a, **k: seen.append(next(block.parameters()).dtype) or real(block, *a, **k))
    cfg = parse_args(["--model", str(tiny_model_dir), "--out", str(tmp_path / "q"), "--method", method, "--group-size", "32",
                      "--n-samples", "4", "--seqlen", "32"])
    run(replace(cfg, search=replace(cfg.search, compute_dtype=torch.bfloat16)), log=lambda m: None, progress=False)
    assert seen == [forward] * (2 * json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"])
