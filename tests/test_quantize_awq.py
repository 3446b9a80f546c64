"""AWQ's pieces on real transformers decoder blocks: folding is exact, the Gram-matrix error is the output error,
the searches win where they should, calibration windows are cut as documented."""

import pytest
import torch

from tinyserve_quantize.awq import QuantResult, SearchConfig, _scaling_tie, dequantize_into, quantize_block
from tinyserve_quantize.calibration import CalibrationError, calibration_windows, run_block
from tinyserve_quantize.clip_search import clip_ratios, search_clip
from tinyserve_quantize.model_families import FAMILIES
from tinyserve_quantize.quantizer import QuantSpec, fake_quantize
from tinyserve_quantize.scale_search import fold_scales, weighted_error


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=256), dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def block_inputs(model, x: torch.Tensor) -> tuple[torch.nn.Module, dict]:
    """Layer 0 and the keyword arguments the model passes to it, for hidden states x [B, S, H]."""
    S = x.shape[1]
    pos = torch.arange(S)[None]
    return model.model.layers[0], {"position_embeddings": model.model.rotary_emb(x, position_ids=pos), "position_ids": pos}


def fake_quantize_block_rtn(block: torch.nn.Module, family, spec: QuantSpec) -> None:
    """The RTN baseline of the block tests: every linear of `block` replaced in place by its round-to-nearest weights."""
    for name in family.linears:
        lin = block.get_submodule(name)
        lin.weight.data = fake_quantize(lin.weight, spec)


def planted(B: int, S: int, H: int, channels: list[int], gain: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, H, generator=g)
    x[..., channels] *= gain
    return x


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@torch.no_grad()
def test_folding_scales_leaves_the_block_output_unchanged(arch):
    model = tiny_model(arch)
    block, kw = block_inputs(model, torch.zeros(1, 16, 192))
    x = torch.randn(2, 16, 192)
    before = block(x, **kw)
    torch.manual_seed(1)
    for group in FAMILIES[arch].groups:
        lins = [block.get_submodule(n) for n in group.linears]
        scalable, tie = _scaling_tie(block, group, gqa=True)
        assert scalable and (tie is not None) == (group.prev == "self_attn.v_proj")  # the tiny models use GQA
        n_prev = lins[0].in_features if tie is None else int(tie.max()) + 1
        s = torch.rand(n_prev) * 4 + 0.1
        fold_scales(block.get_submodule(group.prev), lins, s if tie is None else s[tie], tie)
    after = block(x, **kw)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert not torch.equal(block.input_layernorm.weight, model.model.norm.weight)  # something was really folded


def test_gram_error_equals_output_mse():
    torch.manual_seed(0)
    X = torch.randn(300, 96) * torch.rand(96) * 3
    W = torch.randn(40, 96)
    dW = fake_quantize(W, QuantSpec(4, 32)) - W
    direct = ((X @ dW.t()) ** 2).sum() / X.shape[0]
    H = X.t() @ X / X.shape[0]
    torch.testing.assert_close(weighted_error(dW, H), direct, rtol=1e-4, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@torch.no_grad()
def test_awq_beats_rtn_on_a_block_with_planted_salient_channels(arch):
    """A few input channels carry 30x the activation of the rest: AWQ protects them, so the block's output error on
    fresh (held-out) inputs is much lower than with RTN."""
    model = tiny_model(arch)
    block, kw = block_inputs(model, torch.zeros(1, 64, 192))
    salient = [3, 50, 77, 150]
    calib = planted(8, 64, 192, salient, 30.0, seed=1)
    fresh = planted(4, 64, 192, salient, 30.0, seed=2)
    reference = block(fresh, **kw)
    spec = QuantSpec(4, 64)
    family = FAMILIES[arch]

    def output_error(search: SearchConfig | None) -> float:
        b = tiny_model(arch).model.layers[0]
        if search is None:
            fake_quantize_block_rtn(b, family, spec)
        else:
            sites = {g.linears[0]: b.get_submodule(g.linears[0]) for g in family.groups}
            _, stats = run_block(b, calib, kw, sites, holdout_every=4)
            result = QuantResult(quantize_block(b, 0, family, spec, search, stats).linears)
            wrapper = torch.nn.Module()
            wrapper.add_module("model", torch.nn.Module())
            wrapper.model.add_module("layers", torch.nn.ModuleList([b]))
            dequantize_into(wrapper, result, spec.group_size)
        return float(((b(fresh, **kw) - reference) ** 2).mean())

    rtn = output_error(None)
    awq = output_error(SearchConfig(compute_dtype=torch.float32))
    scale_only = output_error(SearchConfig(clip=False, compute_dtype=torch.float32))
    every_step = output_error(SearchConfig(gqa_vo=True, refit=True, compute_dtype=torch.float32))
    assert awq < 0.5 * rtn, (awq, rtn)
    assert every_step < 0.5 * rtn, (every_step, rtn)
    assert scale_only < 0.7 * rtn, (scale_only, rtn)


def test_clip_search_never_loses_to_no_clip_on_fit_tokens():
    torch.manual_seed(0)
    X = torch.randn(512, 128)
    W = torch.randn(16, 128)
    W[:, 5] *= 8  # outliers that make clipping attractive
    H = X.t() @ X / len(X)
    spec = QuantSpec(4, 64)
    choice = search_clip(W, H, H, spec, clip_ratios(), "range", holdout_gate=False)
    clipped = weighted_error(fake_quantize(W, spec, choice.lo, choice.hi) - W, H)
    plain = weighted_error(fake_quantize(W, spec) - W, H)
    assert clipped <= plain
    assert (choice.ratio < 1).any() and (choice.ratio >= 0.55 - 1e-6).all()


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [ord(c) for c in text]})()


def test_calibration_windows_fewer_than_asked_uses_all_with_a_message():
    messages = []
    w = calibration_windows(_CharTokenizer(), "x" * 1000, n_samples=128, seqlen=100, log=messages.append)
    assert w.shape == (10, 100)
    assert messages and "gives 10 windows" in messages[0] and "asked for 128" in messages[0]


def test_calibration_windows_spread_over_a_long_text():
    text = "".join(chr(0x100 + i) for i in range(1000))  # token id - 0x100 = position in the text
    w = calibration_windows(_CharTokenizer(), text, n_samples=3, seqlen=100, log=lambda m: None)
    assert w.shape == (3, 100)
    assert (w[:, 0] - 0x100).tolist() == [0, 300, 700]  # evenly spread, whole non-overlapping windows
    assert torch.equal(w[1] - 0x100, torch.arange(300, 400))


def test_calibration_text_shorter_than_a_window_is_an_error():
    with pytest.raises(CalibrationError, match="fewer than one window"):
        calibration_windows(_CharTokenizer(), "short", n_samples=4, seqlen=100)
