"""The gate (tinyserve_quantize/clip_gate.py): per sub-block it keeps the search's weights or takes a candidate (unclipped, or
RTN of the original weights with the norms unfolded) by which brings the model's next-token distributions closer to
the unquantized model's, and what it reports is what the written model computes."""

import pytest
import torch

from tinyserve_kernels.layout import pack_linear
from tinyserve_quantize.awq import PackedLinear, SearchConfig, awq_quantize, dequantize_into
from tinyserve_quantize.clip_gate import Candidate, _Reference, _Tail, better, gate_sub_blocks, sub_blocks
from tinyserve_quantize.model_families import FAMILIES
from tinyserve_quantize.quantizer import QuantSpec, quantize_weight
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

    outcome = gate_sub_blocks(model, family, clipped, [Candidate("unclipped", unclipped)], windows(), SPEC.group_size,
                              torch.float32)

    assert outcome.decisions == {f"{family.layers}.0.mlp.": ("unclipped", {})}
    assert outcome.tested == 2
    assert outcome.kl_final < outcome.kl_search
    for n in names:
        assert clipped[n] is good[n], n  # block 0's MLP replaced by the good weights, block 1 kept its own


def test_gate_sets_a_winning_candidates_norms_and_picks_the_best_candidate():
    model, family = tiny_model("llama"), FAMILIES["llama"]
    names = [f"{family.layers}.{i}.{n}" for i in range(2) for n in family.linears]
    good = {n: packed(model.get_submodule(n).weight.detach()) for n in names}
    attn0 = [n for n in names if n.startswith(f"{family.layers}.0.self_attn.")]
    chosen = dict(good)
    for n in attn0:
        chosen[n] = packed(model.get_submodule(n).weight.detach(), 0.5)
    norm = f"{family.layers}.0.input_layernorm.weight"
    w = model.get_parameter(norm).detach()
    # Both candidates restore the attention weights; one also triples its input norm (worse), one keeps it.
    worse = Candidate("unclipped", {n: good[n] for n in attn0}, {norm: 3 * w})
    best = Candidate("rtn", {n: good[n] for n in attn0}, {norm: w.clone()})
    outcome = gate_sub_blocks(model, family, chosen, [worse, best], windows(), SPEC.group_size, torch.float32)
    label, params = outcome.decisions[f"{family.layers}.0.self_attn."]
    assert label == "rtn" and torch.equal(params[norm], w)
    assert all(chosen[n] is good[n] for n in attn0)


def test_sub_blocks_hold_their_norms():
    assert sub_blocks(FAMILIES["qwen2"]) == [("self_attn.", ("input_layernorm",)), ("mlp.", ("post_attention_layernorm",))]


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


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_written_model_is_what_the_gate_measured(arch):
    """After AWQ with the gate (fp32 throughout), the model as exported (folded norms as the gate left them, packed
    linears dequantized) has exactly the KL to the unquantized model that the gate reports: every decision, norms
    included, reached both the packed weights and the model."""
    original, family = tiny_model(arch), FAMILIES[arch]
    model = tiny_model(arch)
    w = windows(8, 64)
    # gate_z=-1: every test takes its best candidate, so decisions (RTN ones included) are made on this tiny model
    search = SearchConfig(compute_dtype=torch.float32, gate_z=-1.0, gate_windows=2)
    result = awq_quantize(model, family, SPEC, w, search, progress=False, log=lambda m: None)
    assert result.gate["decisions"], "the gate made no decision: the test would check nothing"
    rows = {r["name"]: r for r in result.report}
    for prefix, label in result.gate["decisions"].items():
        assert all(r["gate"] == label for n, r in rows.items() if n.startswith(prefix) and "gate" in r)
    assert not result.unclipped and not result.rtn  # the alternatives are not kept after the gate
    dequantize_into(model, result, SPEC.group_size)
    held = w[[3, 7]]  # the held-out windows the gate ran on (every 4th of 8)
    tail = _Tail(original, family, held, torch.float32)
    ref = _Reference(tail, tail.hidden(0, tail.inputs))
    tail_q = _Tail(model, family, held, torch.float32)
    assert abs(float(ref.kl(tail_q.hidden(0, tail_q.inputs)).mean()) - result.gate["kl_final"]) < 1e-4
