"""End-to-end gate on the clip search: keep a block's clips only where they bring the whole model closer to fp.

The clip search (clip_search.py) minimises each linear's output MSE, and on some models that criterion is wrong: on
Qwen2.5-Coder-0.5B the chosen clips lower every MLP's output error yet shrink its outputs ~2% in the same direction
for every token, which adds up through the residual stream and makes AWQ worse than RTN (BENCHMARKS.md, issue 2).
No per-layer error sees that; the model's output does. So, after the search, each sub-block's clips (attention: the
clipped v/o; MLP: gate/up/down) are put to one test: the KL divergence of the quantized model's next-token
distribution from the unquantized one's, on held-out calibration windows. Greedy, first block to last: a sub-block
goes back to its unclipped weights (same AWQ scales, plain rounding) when that lowers the KL by more than z standard
errors of the per-token difference (better()).

Cost: the blocks before the one being decided do not change, so each test runs only the rest of the model, from the
decided block's cached input; about one full forward of the held-out windows per block, in bf16 on a throwaway copy.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kernels.layout import dequantize
from quantize.model_families import Family

SUB_BLOCKS = ("self_attn.", "mlp.")


@dataclass
class GateOutcome:
    kl_clipped: float  # mean KL per token (nats) with every clip the search chose
    kl_final: float  # after the gate
    dropped: list[str]  # sub-blocks ("model.layers.3.mlp.") that went back to unclipped weights
    tested: int  # sub-blocks that had clips to test


class _Stop(Exception):
    pass


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
        self.dtype = dtype
        h, kw = [], {}

        def hook(module, args, kwargs):
            h.append(args[0] if args else kwargs["hidden_states"])
            if not kw:
                kw.update({k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "use_cache", "cache_position")})
            raise _Stop

        handle = self.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for w in windows:
                try:
                    self.model(input_ids=w[None], use_cache=False)
                except _Stop:
                    pass
        finally:
            handle.remove()
        self.inputs = h  # per window [1, S, H] at block 0
        self.kwargs = kw

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


@torch.no_grad()
def gate_clips(
    model: nn.Module,
    family: Family,
    clipped: dict,
    unclipped: dict,
    windows: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.bfloat16,
    z: float = 2.0,
    progress: Callable | None = None,
) -> GateOutcome:
    """model: the fp *ForCausalLM with AWQ's scales folded in (its linears still unquantized: the reference).
    clipped / unclipped: full linear name -> PackedLinear; unclipped holds only linears whose clips differ.
    windows [B, S] held-out token ids. Returns the outcome; `clipped` is updated in place with the decisions."""
    tail = _Tail(model, family, windows, dtype)
    ref = _Reference(tail, tail.hidden(0, tail.inputs))  # before any weight is quantized

    def load(names: list[str], packed: dict) -> None:
        for n in names:
            p = packed[n]
            lin = tail.model.get_submodule(n)
            lin.weight.data = dequantize(p.qweight, p.qzeros, p.scales, group_size).t().to(dtype).contiguous()

    load(list(clipped), clipped)
    hs = tail.inputs
    current = ref.kl(tail.hidden(0, hs))
    first, dropped, tested = float(current.mean()), [], 0
    blocks = range(len(tail.layers))
    for i in progress(blocks) if progress else blocks:
        for part in SUB_BLOCKS:
            prefix = f"{family.layers}.{i}.{part}"
            names = [n for n in unclipped if n.startswith(prefix)]
            if not names:
                continue
            tested += 1
            load(names, unclipped)
            kl = ref.kl(tail.hidden(i, hs))
            if better(kl, current, z):
                current = kl
                dropped.append(prefix)
                for n in names:
                    clipped[n] = unclipped[n]
            else:
                load(names, clipped)
        hs = [tail.block(i, h) for h in hs]
    return GateOutcome(first, float(current.mean()), dropped, tested)
