"""End-to-end gate on the search's choices: per sub-block, keep AWQ's weights only where they bring the whole model
closer to fp than the alternatives do.

The clip search (clip_search.py) minimises each linear's output MSE, and on some models that criterion is wrong: on
Qwen2.5-Coder-0.5B the chosen clips lower every MLP's output error yet shrink its outputs ~2% in the same direction
for every token, which adds up through the residual stream and makes AWQ worse than RTN (BENCHMARKS.md, issue 2).
No per-layer error sees that; the model's output does. So, after the search, each sub-block (attention: its input
norm and q/k/v/o; MLP: its input norm and gate/up/down) is put to one test against its candidates: "unclipped"
(AWQ's scales, plain rounding) where it was clipped, and "rtn" (its original weights and norm, no scales, plain
rounding) where it was scaled or clipped. The measure is the KL divergence of the quantized model's next-token
distribution from the unquantized one's, on held-out calibration windows. Greedy, first block to last: the best
candidate replaces the current weights when it lowers the KL by more than z standard errors of the per-token
difference (better()). A sub-block holds every op its scaling groups fold into, so each swap is exact.

Cost: the blocks before the one being decided do not change, so each test runs only the rest of the model, from the
decided block's cached input; about one full forward of the held-out windows per block and candidate, in bf16 on a
throwaway copy.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tinyserve_kernels.layout import dequantize
from tinyserve_quantize.calibration import capture_block_inputs
from tinyserve_quantize.model_families import Family


@dataclass
class GateOutcome:
    kl_search: float  # mean KL per token (nats) with the search's choices
    kl_final: float  # after the gate
    decisions: dict  # sub-block ("model.layers.3.mlp.") -> (label of the candidate it took, parameter values it set)
    tested: int  # sub-blocks that had candidates to test


class _Tail:
    """A bf16 copy of the model that runs decoder blocks [i, L) plus the final norm and head on cached inputs."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, family: Family, windows: torch.Tensor, dtype: torch.dtype):
        # Copy straight into `dtype`: deepcopy(model).to(dtype) would first hold a second fp32 copy of every weight.
        memo = {id(t): nn.Parameter(t.detach().to(dtype), requires_grad=False) for t in model.parameters()}
        memo.update({id(t): t.to(dtype) if t.is_floating_point() else t.clone() for t in model.buffers()})
        self.model = copy.deepcopy(model, memo)
        self.layers = self.model.get_submodule(family.layers)
        self.norm = self.model.get_submodule(family.norm)
        inputs, self.kwargs = capture_block_inputs(self.model, self.layers, windows)  # [B, S, H] fp32 (exact from dtype)
        self.inputs = list(inputs.to(dtype).split(1))  # per window [1, S, H] at block 0

    def block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        out = self.layers[i](h, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def hidden(self, i: int, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run blocks [i, L) and the final norm on each window's block-i input; -> per window [S, H]."""
        out = []
        for h in hs:
            for j in range(i, len(self.layers)):
                h = self.block(j, h)
            out.append(self.norm(h)[0])
        return out


class _Reference:
    """The unquantized model's next-token distributions, kept on each token's TOP_K most likely tokens.

    KL(p || q) over the full vocabulary would need a logsumexp over V for every token of every test (V = 151,936 on
    Qwen2: most of the gate's time). Restricted to the reference's top tokens, both distributions renormalised there,
    it needs the head's rows for the union of those tokens only (a few thousand per window), and it still sees what
    the gate is after: the quantized model's preferences among the tokens that matter moving away from fp's.
    """

    TOP_K = 64

    @torch.no_grad()
    def __init__(self, tail: _Tail, normed: list[torch.Tensor]):
        head = tail.model.get_output_embeddings().weight  # [V, H]
        self.rows, self.pos, self.p, self.logp = [], [], [], []
        for x in normed:
            top = (x @ head.t()).float().topk(self.TOP_K, dim=-1)  # [S, k]
            union, pos = top.indices.unique(return_inverse=True)  # [U], [S, k]
            logp = torch.log_softmax(top.values, dim=-1)
            self.rows.append(head[union])  # [U, H]
            self.pos.append(pos)
            self.p.append(logp.exp())
            self.logp.append(logp)

    @torch.no_grad()
    def kl(self, normed: list[torch.Tensor]) -> torch.Tensor:
        """Per token KL(p || q) on its top-k support, all windows concatenated -> [T]; normed: per window [S, H]."""
        out = []
        for x, rows, pos, p, logp in zip(normed, self.rows, self.pos, self.p, self.logp):
            logq = torch.log_softmax((x @ rows.t()).float().gather(1, pos), dim=-1)  # [S, k]
            out.append((p * (logp - logq)).sum(-1))
        return torch.cat(out)


def better(candidate: torch.Tensor, current: torch.Tensor, z: float) -> bool:
    """Is the candidate's mean per-token KL lower than the current one's by more than z standard errors of the
    paired per-token difference? (The clip search's choice stands unless the evidence against it is clear: with a
    few thousand tokens and dozens of decisions, "any decrease" drops clips on noise.)"""
    d = current - candidate  # [T]
    return bool(d.mean() > z * d.std() / len(d) ** 0.5)


def sub_blocks(family: Family) -> list[tuple[str, tuple[str, ...]]]:
    """[(linear prefix inside a block, the norms that feed it)]: ("self_attn.", ("input_layernorm",)), ("mlp.", ...).
    A sub-block holds every op its scaling groups fold into, so it can be swapped as a whole."""
    out: dict[str, list[str]] = {}
    for g in family.groups:
        prefix = g.linears[0].split(".")[0] + "."
        norms = out.setdefault(prefix, [])
        if g.prev is not None and g.prev not in family.linears and g.prev not in norms:
            norms.append(g.prev)
    return [(prefix, tuple(norms)) for prefix, norms in out.items()]


@dataclass
class Candidate:
    """Another way to quantize some sub-blocks: packed linears and parameter values (full names) replacing the
    chosen ones wherever this candidate wins."""

    label: str  # "unclipped" (AWQ's scales, plain rounding) or "rtn" (no scales, plain rounding of the original)
    linears: dict  # full linear name -> PackedLinear
    params: dict = field(default_factory=dict)  # full parameter name -> tensor (the norms' weights before folding)


@torch.no_grad()
def gate_sub_blocks(
    model: nn.Module,
    family: Family,
    chosen: dict,
    candidates: list[Candidate],
    windows: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.bfloat16,
    z: float = 2.0,
    progress: Callable | None = None,
) -> GateOutcome:
    """model: the fp *ForCausalLM with AWQ's scales folded in (its linears still unquantized: the reference).
    chosen: full linear name -> PackedLinear, the search's result, updated in place with the decisions.
    candidates: alternatives for some sub-blocks. windows [B, S] held-out token ids. Per sub-block, first block to
    last, the candidate with the lowest KL replaces the current weights if it is better() than them."""
    tail = _Tail(model, family, windows, dtype)
    ref = _Reference(tail, tail.hidden(0, tail.inputs))  # before any weight is quantized

    def load(names: list[str], packed: dict) -> None:
        for n in names:
            p = packed[n]
            lin = tail.model.get_submodule(n)
            lin.weight.data = dequantize(p.qweight, p.qzeros, p.scales, group_size).t().to(dtype).contiguous()
            if p.bias is not None:
                lin.bias.data = p.bias.to(dtype)

    def set_params(values: dict) -> None:
        for name, v in values.items():
            tail.model.get_parameter(name).data = v.to(dtype)

    load(list(chosen), chosen)
    hs = tail.inputs
    current = ref.kl(tail.hidden(0, hs))
    first, decisions, tested = float(current.mean()), {}, 0
    parts = sub_blocks(family)
    blocks = range(len(tail.layers))
    for i in progress(blocks) if progress else blocks:
        for part, norms in parts:
            prefix = f"{family.layers}.{i}.{part}"
            norm_params = [f"{family.layers}.{i}.{n}.{w}" for n in norms for w, _ in tail.model.get_submodule(f"{family.layers}.{i}.{n}").named_parameters()]
            own = [c for c in candidates if any(n.startswith(prefix) for n in c.linears)]
            if not own:
                continue
            tested += 1
            before = {k: tail.model.get_parameter(k).detach().clone() for k in norm_params}
            best = None
            for c in own:
                names = [n for n in c.linears if n.startswith(prefix)]
                params = {k: v for k, v in c.params.items() if k in before}
                load(names, c.linears)
                set_params(params)
                kl = ref.kl(tail.hidden(i, hs))
                if better(kl, current, z) and (best is None or kl.mean() < best[1].mean()):
                    best = (c, kl, names, params)
                load(names, chosen)
                set_params(before)
            if best is not None:
                c, current, names, params = best
                decisions[prefix] = (c.label, params)
                for n in names:
                    chosen[n] = c.linears[n]
                load(names, chosen)
                set_params(params)
        hs = [tail.block(i, h) for h in hs]
    return GateOutcome(first, float(current.mean()), decisions, tested)
