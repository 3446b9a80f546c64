"""The gate (tinyserve_quantize/clip_gate.py): per sub-block it keeps the search's weights or takes a candidate (unclipped, or
RTN of the original weights with the norms unfolded) by which brings the model's next-token distributions closer to
the unquantized model's, and what it reports is what the written model computes."""

import pytest
import torch

from tinyserve_kernels.layout import pack_linear
from tinyserve_quantize.awq import Alternative, BlockOutput, PackedLinear, SearchConfig, block_params, dequantize_into
from tinyserve_quantize.blocks import LoadedModel
from tinyserve_quantize.clip_gate import Gate, _Reference, better, stages
from tinyserve_quantize.methods import quantize_model
from tinyserve_quantize.model_families import FAMILIES, sub_blocks
from tinyserve_quantize.quantizer import QuantSpec, quantize_weight
from tests.test_quantize_awq import tiny_model

SPEC = QuantSpec(4, 64)


def packed(W: torch.Tensor, scale: float = 1.0) -> PackedLinear:
    """RTN of W [N, K], with every weight multiplied by `scale` first (scale != 1: a damaged candidate)."""
    codes, zeros, scales = quantize_weight(W * scale, SPEC)
    return PackedLinear(*pack_linear(codes, zeros, scales), None)


def windows(n: int = 2, S: int = 48, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (n, S), generator=torch.Generator().manual_seed(1))


def run_gate(model, family, chosen: dict, alternatives: dict[str, Alternative], tmp_path, chosen_params: dict | None = None,
             n_windows: int = 2) -> tuple:
    """Record every block of the in-memory model (the reference) with the given chosen linears (and parameters, by
    default the model's) and alternatives, then decide, in fp32. Returns (outcome, every block's final linears, params)."""
    gate = Gate(LoadedModel(model, family), windows(n_windows), SPEC.group_size, tmp_path, torch.float32)
    for i, block in enumerate(model.get_submodule(family.layers)):
        inside = f"{family.layers}.{i}."
        alts = {label: Alternative({n: p for n, p in a.linears.items() if n.startswith(inside)},
                                   {n: v for n, v in a.params.items() if n.startswith(inside)},
                                   {n: {} for n in a.linears if n.startswith(inside)})
                for label, a in alternatives.items()}
        params = {n: (chosen_params or {}).get(n, v) for n, v in block_params(block, i, family).items()}
        gate.record(block, BlockOutput(i, {n: p for n, p in chosen.items() if n.startswith(inside)}, params, [],
                                       {k: a for k, a in alts.items() if a.linears}))
    outcome = gate.decide()
    final_linears, final_params = {}, {}
    for i in range(len(model.get_submodule(family.layers))):
        lins, params = gate.block(i)
        final_linears.update(lins)
        final_params.update(params)
    return outcome, final_linears, final_params


def same(a: PackedLinear, b: PackedLinear) -> bool:
    return torch.equal(a.qweight, b.qweight) and torch.equal(a.qzeros, b.qzeros) and torch.equal(a.scales, b.scales)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gate_takes_whichever_candidate_is_closer_to_fp(arch, tmp_path):
    model, family = tiny_model(arch), FAMILIES[arch]
    names = [f"{family.layers}.{i}.{n}" for i in range(2) for n in family.linears]
    good = {n: packed(model.get_submodule(n).weight.detach()) for n in names}
    # Block 0's MLP: the "clipped" choice is damaged (weights halved), so the gate must drop it. Block 1's
    # attention: the "unclipped" alternative is the damaged one, so the gate must keep the clipped choice.
    mlp0 = [n for n in names if n.startswith(f"{family.layers}.0.mlp.")]
    attn1 = [n for n in names if n.startswith(f"{family.layers}.1.self_attn.") and n.endswith(("v_proj", "o_proj"))]
    clipped = dict(good)
    for n in mlp0:
        clipped[n] = packed(model.get_submodule(n).weight.detach(), 0.5)
    unclipped = {n: good[n] for n in mlp0}
    unclipped.update({n: packed(model.get_submodule(n).weight.detach(), 0.5) for n in attn1})

    outcome, final, _ = run_gate(model, family, clipped, {"unclipped": Alternative(unclipped)}, tmp_path)

    assert outcome.decisions == {f"{family.layers}.0.mlp.": "unclipped"}
    assert outcome.tested == 2
    assert outcome.kl_final < outcome.kl_search
    for n in names:
        assert same(final[n], good[n]), n  # block 0's MLP replaced by the good weights, block 1 kept its own


def test_gate_sets_a_winning_candidates_norms_and_picks_the_best_candidate(tmp_path):
    model, family = tiny_model("llama"), FAMILIES["llama"]
    names = [f"{family.layers}.{i}.{n}" for i in range(2) for n in family.linears]
    good = {n: packed(model.get_submodule(n).weight.detach()) for n in names}
    attn0 = [n for n in names if n.startswith(f"{family.layers}.0.self_attn.")]
    chosen = dict(good)
    for n in attn0:
        chosen[n] = packed(model.get_submodule(n).weight.detach(), 0.5)
    norm = f"{family.layers}.0.input_layernorm.weight"
    w = model.get_parameter(norm).detach().clone()
    # Both candidates restore the attention weights; one also triples its input norm (worse), one keeps it.
    worse = Alternative({n: good[n] for n in attn0}, {norm: 3 * w})
    best = Alternative({n: good[n] for n in attn0}, {norm: w.clone()})
    # The chosen weights' norm is damaged too: only the alternative's norm restores it.
    outcome, final, params = run_gate(model, family, chosen, {"unclipped": worse, "rtn": best}, tmp_path, {norm: 0.5 * w})
    assert outcome.decisions[f"{family.layers}.0.self_attn."] == "rtn"
    assert torch.equal(params[norm], w)
    assert all(same(final[n], good[n]) for n in attn0)


def test_sub_blocks_hold_their_norms():
    assert sub_blocks(FAMILIES["qwen2"]) == [("self_attn.", ("input_layernorm",)), ("mlp.", ("post_attention_layernorm",))]


def final_hidden(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The final norm's output of each window [S, H] (what the gate's reference is built on)."""
    with torch.no_grad():
        return [model.model(input_ids=w[None]).last_hidden_state[0] for w in ids]


def test_reference_kl_is_zero_for_the_unquantized_model_and_grows_with_damage():
    model = tiny_model("llama")
    ids = windows()
    ref = _Reference(model.lm_head.weight.detach(), final_hidden(model, ids))
    assert torch.cat(ref.kl(final_hidden(model, ids), [0, 1])).abs().max() < 1e-5
    down = model.model.layers[0].mlp.down_proj
    kls = []
    for factor in (0.9, 0.5):
        with torch.no_grad():
            down.weight.mul_(factor)
        kls.append(torch.cat(ref.kl(final_hidden(model, ids), [0, 1])))
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
    result = quantize_model("awq", model, family, SPEC, w, search, progress=False, log=lambda m: None)
    assert result.gate["decisions"], "the gate made no decision: the test would check nothing"
    rows = {r["name"]: r for r in result.report}
    for prefix, label in result.gate["decisions"].items():
        assert all(r["gate"] == label for n, r in rows.items() if n.startswith(prefix) and "gate" in r)
    dequantize_into(model, result, SPEC.group_size)
    held = w[[3, 7]]  # the held-out windows the gate ran on (every 4th of 8)
    ref = _Reference(original.lm_head.weight.detach(), final_hidden(original, held))
    assert abs(float(torch.cat(ref.kl(final_hidden(model, held), [0, 1])).mean()) - result.gate["kl_final"]) < 1e-4


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 11])
def test_stages_run_every_window_once_spread_out(n):
    order = [w for stage in stages(n) for w in stage]
    assert sorted(order) == list(range(n))
    sizes = [len(s) for s in stages(n)]
    assert sizes[0] == 1 and all(size <= sum(sizes[:k]) for k, size in enumerate(sizes) if k)  # looks at 1, 2, 4, ...


def test_stages_of_eight_windows():
    assert stages(8) == [[0], [4], [2, 6], [1, 5, 3, 7]]


def test_a_test_far_behind_stops_early_and_the_decisions_are_those_of_full_tests(tmp_path, monkeypatch):
    """Block 0's MLP: a good candidate against damaged chosen weights (taken, so it must run every window); block 1's
    attention: a damaged candidate (far behind after the first stage: it must stop there). The early stop must not
    change what the gate decides or reports."""
    model, family = tiny_model("llama"), FAMILIES["llama"]
    names = [f"{family.layers}.{i}.{n}" for i in range(2) for n in family.linears]
    good = {n: packed(model.get_submodule(n).weight.detach()) for n in names}
    mlp0 = [n for n in names if n.startswith(f"{family.layers}.0.mlp.")]
    attn1 = [n for n in names if n.startswith(f"{family.layers}.1.self_attn.")]
    chosen = dict(good) | {n: packed(model.get_submodule(n).weight.detach(), 0.5) for n in mlp0}
    alt = Alternative({n: good[n] for n in mlp0} | {n: packed(model.get_submodule(n).weight.detach(), 0.3) for n in attn1})
    runs = []
    tail = Gate._tail

    def counted(self, i, first, hs):
        runs.append((i, len(hs)))
        return tail(self, i, first, hs)

    monkeypatch.setattr(Gate, "_tail", counted)
    (tmp_path / "staged").mkdir()
    outcome, final, _ = run_gate(model, family, chosen, {"unclipped": alt}, tmp_path / "staged", n_windows=8)
    staged_runs, runs[:] = list(runs), []
    monkeypatch.setattr(Gate, "FUTILITY_MARGIN", float("inf"))
    (tmp_path / "full").mkdir()
    full, final_full, _ = run_gate(model, family, chosen, {"unclipped": alt}, tmp_path / "full", n_windows=8)

    assert outcome.decisions == full.decisions == {f"{family.layers}.0.mlp.": "unclipped"}
    assert outcome.kl_final == full.kl_final and all(same(final[n], final_full[n]) for n in names)
    # the first tail is the search's choices over all windows; then block 0's test runs all 8, block 1's only stage 1
    assert staged_runs == [(0, 8), (0, 1), (0, 1), (0, 2), (0, 4), (1, 1)]
    assert runs == [(0, 8), (0, 1), (0, 1), (0, 2), (0, 4), (1, 1), (1, 1), (1, 2), (1, 4)]
