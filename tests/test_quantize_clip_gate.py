"""The clip gate (quantize/clip_gate.py): it keeps a sub-block's clipped weights or takes the unclipped ones by which
brings the model's next-token distributions closer to the unquantized model's, and it changes nothing else."""

import pytest
import torch

from kernels.layout import pack_linear
from quantize.awq import PackedLinear, SearchConfig, awq_quantize
from quantize.clip_gate import _Reference, _Tail, better, gate_clips
from quantize.model_families import FAMILIES
from quantize.quantizer import QuantSpec, quantize_weight
from tests.test_quantize_awq import tiny_model

SPEC = QuantSpec(4, 64)


def packed(W: torch.Tensor, scale: float = 1.0) -> PackedLinear:
    """RTN of W [N, K], with every weight multiplied by `scale` first (scale != 1: a damaged candidate)."""
    codes, zeros, scales = quantize_weight(W * scale, SPEC)
    return PackedLinear(*pack_linear(codes, zeros, scales), None)


def windows(n: int = 2, S: int = 48, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (n, S), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gate_takes_whichever_candidate_is_closer_to_fp(arch):
    model, family = tiny_model(arch), FAMILIES[arch]
    names = [f"{family.layers}.{i}.{n}" for i in range(2) for n in family.linears]
    good = {n: packed(model.get_submodule(n).weight.detach()) for n in names}
    # Block 0's MLP: the "clipped" candidate is damaged (weights halved), so the gate must drop it. Block 1's
    # attention: the "unclipped" alternative is the damaged one, so the gate must keep the clipped candidate.
    mlp0 = [n for n in names if n.startswith(f"{family.layers}.0.mlp.")]
    attn1 = [n for n in names if n.startswith(f"{family.layers}.1.self_attn.") and n.endswith(("v_proj", "o_proj"))]
    clipped = dict(good)
    for n in mlp0:
        clipped[n] = packed(model.get_submodule(n).weight.detach(), 0.5)
    unclipped = {n: good[n] for n in mlp0}
    unclipped.update({n: packed(model.get_submodule(n).weight.detach(), 0.5) for n in attn1})

    outcome = gate_clips(model, family, clipped, unclipped, windows(), SPEC.group_size, torch.float32)

    assert outcome.dropped == [f"{family.layers}.0.mlp."]
    assert outcome.tested == 2
    assert outcome.kl_final < outcome.kl_clipped
    for n in names:
        assert clipped[n] is good[n], n  # block 0's MLP replaced by the good weights, block 1 kept its own


def test_reference_kl_is_zero_for_the_unquantized_model_and_grows_with_damage():
    model, family = tiny_model("llama"), FAMILIES["llama"]
    tail = _Tail(model, family, windows(), torch.float32)
    ref = _Reference(tail, tail.hidden(0, tail.inputs))
    assert ref.kl(tail.hidden(0, tail.inputs)).abs().max() < 1e-5
    down = tail.model.get_submodule(f"{family.layers}.0.mlp.down_proj")
    kls = []
    for factor in (0.9, 0.5):
        with torch.no_grad():
            down.weight.mul_(factor)
        kls.append(ref.kl(tail.hidden(0, tail.inputs)))
    assert 0 < kls[0].mean() < kls[1].mean()
    assert better(kls[0], kls[1], z=2.0) and not better(kls[1], kls[0], z=0.0)


def test_better_needs_a_clear_paired_difference():
    g = torch.Generator().manual_seed(0)
    current = torch.rand(2000, generator=g)
    noise = 0.05 * torch.randn(2000, generator=g)
    noise -= noise.mean()  # exactly no change on average
    assert not better(current + noise, current, z=2.0)  # no real change: noise alone must not flip a decision
    assert better(current - 0.01 + noise, current, z=2.0)  # a consistent drop of 0.01 per token is one
    assert better(current - 0.001 + noise, current, z=0.0) and not better(current - 0.001 + noise, current, z=2.0)


def test_awq_with_the_gate_records_each_decision_in_the_report():
    model, family = tiny_model("qwen2"), FAMILIES["qwen2"]
    result = awq_quantize(model, family, SPEC, windows(8, 64), SearchConfig(compute_dtype=torch.float32), progress=False,
                          log=lambda m: None)
    gated = [r for r in result.report if "clip_gate" in r]
    assert gated and {r["clip_gate"] for r in gated} <= {"kept", "dropped"}
    assert all(r["clip_mean_ratio"] == 1.0 for r in gated if r["clip_gate"] == "dropped")
    assert not result.unclipped  # the alternatives are not kept after the gate
    assert result.gate["windows"] == 2 and result.gate["tested"] >= 1  # 8 windows: every 4th (2) is held out
    assert {n for r in gated if r["clip_gate"] == "dropped" for n in [r["name"]]} == {
        r["name"] for r in gated if any(r["name"].startswith(p) for p in result.gate["dropped"])}
