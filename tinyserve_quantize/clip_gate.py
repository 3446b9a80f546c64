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
decided block's cached input, in bf16. A test runs the windows in stages (stages(): looks after 1, 2 and 4 of 8) and
stops when the candidate is already far behind the current weights (with z = 2, by more than one standard error):
most candidates are (Qwen2.5-Coder-0.5B takes 8 of 96), and on that model no candidate that ends up better() was ever
that far behind at a look (BENCHMARKS.md), so the decisions are those of full tests at about 60% of their cost.

Memory: the gate holds no model. While the blocks are quantized (blockwise.py), record() runs each folded, still
unquantized block on the gate's windows (the reference's forward, one block at a time) and spills the block's packed
linears, norms and alternatives to a folder; decide() then runs blocks from the spill, dequantized, keeping the last
blocks (the ones every later test runs) in memory within a byte budget.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call

from tinyserve_kernels.layout import dequantize
from tinyserve_quantize.awq import BlockOutput, PackedLinear
from tinyserve_quantize.calibration import capture_block_inputs, cast
from tinyserve_quantize.model_families import sub_blocks

@dataclass
class GateOutcome:
    kl_search: float  # mean KL per token (nats) with the search's choices
    kl_final: float  # after the gate
    decisions: dict  # sub-block ("model.layers.3.mlp.") -> label of the alternative it took
    tested: int  # sub-blocks that had alternatives to test


class _Reference:
    """The unquantized model's next-token distributions, kept on each token's TOP_K most likely tokens.

    KL(p || q) over the full vocabulary would need a logsumexp over V for every token of every test (V = 151,936 on
    Qwen2: most of the gate's time). Restricted to the reference's top tokens, both distributions renormalised there,
    it needs the head's rows for the union of those tokens only (a few thousand per window), and it still sees what
    the gate is after: the quantized model's preferences among the tokens that matter moving away from fp's.
    """

    TOP_K = 64

    @torch.no_grad()
    def __init__(self, head: torch.Tensor, normed: list[torch.Tensor]):
        """head [V, H], normed: per window the final norm's output [S, H], both in the gate's dtype."""
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
    def kl(self, normed: list[torch.Tensor], windows: list[int]) -> list[torch.Tensor]:
        """Per token KL(p || q) on its top-k support -> per window [S]; normed: per window [S, H] of those windows."""
        out = []
        for x, w in zip(normed, windows):
            logq = torch.log_softmax((x @ self.rows[w].t()).float().gather(1, self.pos[w]), dim=-1)  # [S, k]
            out.append((self.p[w] * (self.logp[w] - logq)).sum(-1))
        return out


def better(candidate: torch.Tensor, current: torch.Tensor, z: float) -> bool:
    """Is the candidate's mean per-token KL lower than the current one's by more than z standard errors of the
    paired per-token difference? (The clip search's choice stands unless the evidence against it is clear: with a
    few thousand tokens and dozens of decisions, "any decrease" drops clips on noise.)"""
    d = current - candidate  # [T]
    return bool(d.mean() > z * d.std() / len(d) ** 0.5)


def stages(n: int) -> list[list[int]]:
    """The order a candidate's test runs the gate's n windows in: looks after 1, 2, 4, ... windows, each stage's
    windows spread over the held-out text (bit-reversed order: for 8, [0] [4] [2, 6] [1, 5, 3, 7])."""
    bits = max(1, (n - 1).bit_length())
    order = sorted(range(n), key=lambda w: int(f"{w:0{bits}b}"[::-1], 2))
    out, start, size = [], 0, 1
    while start < n:
        out.append(order[start:start + size])
        start += size
        size = max(1, start)
    return out


def _spill(out: BlockOutput) -> dict[str, torch.Tensor]:
    """A block's chosen and alternative tensors under "<tag>|L|<linear>.<field>" and "<tag>|P|<parameter>" keys."""
    flat, seen = {}, set()

    def put(key: str, t: torch.Tensor) -> None:
        flat[key] = t.clone() if t.data_ptr() in seen else t.contiguous()  # safetensors refuses shared storage
        seen.add(t.data_ptr())

    for tag, linears, params in [("chosen", out.linears, out.params)] + [(k, a.linears, a.params) for k, a in out.alternatives.items()]:
        for name, p in linears.items():
            for f in ("qweight", "qzeros", "scales", "bias"):
                if getattr(p, f) is not None:
                    put(f"{tag}|L|{name}.{f}", getattr(p, f))
        for name, t in params.items():
            put(f"{tag}|P|{name}", t)
    return flat


def _unspill(flat: dict[str, torch.Tensor]) -> dict[str, tuple[dict[str, PackedLinear], dict[str, torch.Tensor]]]:
    """_spill's keys -> tag -> (linears, params)."""
    parts: dict[str, tuple[dict, dict]] = {}
    fields: dict[tuple[str, str], dict] = {}
    for key, t in flat.items():
        tag, kind, name = key.split("|")
        params = parts.setdefault(tag, ({}, {}))[1]
        if kind == "P":
            params[name] = t
        else:
            lin, f = name.rsplit(".", 1)
            fields.setdefault((tag, lin), {})[f] = t
    for (tag, lin), f in fields.items():
        parts[tag][0][lin] = PackedLinear(f["qweight"], f["qzeros"], f["scales"], f.get("bias"))
    return parts


class Gate:
    """Runs the gate over a model given block by block (blocks.py's sources), from a spill folder."""

    # a test stops once the candidate's paired z-score (see better()) is this far below the bar z it has to clear
    FUTILITY_MARGIN = 3.0

    @torch.no_grad()
    def __init__(self, source, windows: torch.Tensor, group_size: int, spill: Path, dtype: torch.dtype = torch.bfloat16,
                 z: float = 2.0, cache_bytes: int = 2 * 2**30, device: str = "cpu"):
        """windows [B, S]: the held-out token ids the gate measures on. cache_bytes: dequantized blocks decide() keeps
        in memory, from the last block backwards (every test runs them); the others are re-read from the spill.
        device: where the blocks run (record() gets its block there already; the spill is in host memory)."""
        self.source, self.family = source, source.family
        self.layers = source.model.get_submodule(self.family.layers)
        self.group_size, self.spill, self.dtype, self.z, self.cache_bytes = group_size, Path(spill), dtype, z, cache_bytes
        self.device = device
        inputs, kwargs = capture_block_inputs(source.model, self.layers, windows)  # [B, S, H] fp32
        # rotary cos/sin [1, S, D] (and a mask, if any) in the gate's dtype, as the blocks compute in it
        self.kwargs = {k: cast(v, dtype, device) for k, v in kwargs.items()}
        self.inputs = list(inputs.to(device, dtype).split(1))  # per window [1, S, H] at block 0
        self.hs = self.inputs  # the reference's hidden states after the blocks recorded so far
        self.rows: dict[str, dict[str, dict]] = {}  # alternative -> full linear name -> its report fields
        self.decisions: dict[str, str] = {}  # sub-block prefix -> label taken
        self.cache: dict[int, dict[str, torch.Tensor]] = {}
        self.cacheable: set[int] = set()  # set by decide()

    def _run(self, i: int, params: dict[str, torch.Tensor], hs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Block i with the given parameters (names inside the block, in the gate's dtype) on each window [1, S, H]."""
        outs = [functional_call(self.layers[i], params, (h,), self.kwargs) for h in hs]
        return [o[0] if isinstance(o, tuple) else o for o in outs]

    @torch.no_grad()
    def record(self, block: nn.Module, out: BlockOutput) -> None:
        """Block out.index's folded, unquantized weights (the reference) and its quantization (the spill)."""
        self.hs = self._run(out.index, {n: p.detach().to(self.dtype) for n, p in block.named_parameters()}, self.hs)
        save_file(_spill(out), str(self.spill / f"block-{out.index:05d}.safetensors"))
        for label, alt in out.alternatives.items():
            self.rows.setdefault(label, {}).update(alt.rows)

    def _parts(self, i: int) -> dict[str, tuple[dict[str, PackedLinear], dict[str, torch.Tensor]]]:
        """Block i's spill: "chosen" and each alternative -> (linears, params), fresh dicts."""
        return _unspill(load_file(str(self.spill / f"block-{i:05d}.safetensors")))

    def block(self, i: int, parts: dict | None = None) -> tuple[dict[str, PackedLinear], dict[str, torch.Tensor]]:
        """Block i's linears and parameters (full names) with the decisions made so far applied (parts: its spill,
        when already read)."""
        parts = parts or self._parts(i)
        linears, params = dict(parts["chosen"][0]), dict(parts["chosen"][1])
        for prefix, norms in sub_blocks(self.family):
            label = self.decisions.get(f"{self.family.layers}.{i}.{prefix}")
            if label is not None:
                self._swap(i, prefix, norms, parts[label], linears, params)
        return linears, params

    def _swap(self, i, prefix, norms, alt, linears, params) -> None:
        """Put the alternative's linears of one sub-block and the parameters of the norms feeding it into linears, params."""
        inside = f"{self.family.layers}.{i}."
        linears.update({n: p for n, p in alt[0].items() if n.startswith(inside + prefix)})
        params.update({n: v for n, v in alt[1].items() if any(n.startswith(inside + nm + ".") for nm in norms)})

    def _state(self, i: int, linears: dict, params: dict) -> dict[str, torch.Tensor]:
        """Full-name packed linears and parameters of block i -> its parameters inside the block, dequantized, in dtype."""
        inside = f"{self.family.layers}.{i}."
        dev = self.device
        state = {n[len(inside):]: v.to(dev, self.dtype) for n, v in params.items()}
        for n, p in linears.items():
            W = dequantize(p.qweight.to(dev), p.qzeros.to(dev), p.scales.to(dev), self.group_size)  # [K, N]
            state[n[len(inside):] + ".weight"] = W.t().to(self.dtype).contiguous()
            if p.bias is not None:
                state[n[len(inside):] + ".bias"] = p.bias.to(dev, self.dtype)
        return state

    def _chosen_state(self, i: int) -> dict[str, torch.Tensor]:
        if i in self.cache:
            return self.cache[i]
        state = self._state(i, *self.block(i))
        if i in self.cacheable:
            self.cache[i] = state
        return state

    def _tail(self, i: int, first: dict[str, torch.Tensor], hs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Blocks [i, L) (block i with `first`'s parameters) and the final norm -> per window [S, H]."""
        hs = self._run(i, first, hs)
        for j in range(i + 1, len(self.layers)):
            hs = self._run(j, self._chosen_state(j), hs)
        return self._norm(hs)

    def _norm(self, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        norm = self.source.model.get_submodule(self.family.norm)
        params = {n: p.detach().to(self.device, self.dtype) for n, p in norm.named_parameters()}
        return [functional_call(norm, params, (h,))[0] for h in hs]

    @torch.no_grad()
    def decide(self, progress: Callable | None = None) -> GateOutcome:
        """Per sub-block, first block to last, the alternative with the lowest KL replaces the current weights if it
        is better() than them."""
        windows = list(range(len(self.inputs)))
        ref = _Reference(self.source.head().to(self.device, self.dtype), self._norm(self.hs))
        L = len(self.layers)
        per_block = sum(p.numel() for p in self.layers[0].parameters()) * self.dtype.itemsize
        self.cacheable = set(range(max(0, L - self.cache_bytes // max(per_block, 1)), L))
        hs = self.inputs
        current = ref.kl(self._tail(0, self._chosen_state(0), hs), windows)  # per window [S]
        first, tested = float(torch.cat(current).mean()), 0
        inside = self.family.layers
        for i in progress(range(L)) if progress else range(L):
            parts = self._parts(i)
            for prefix, norms in sub_blocks(self.family):
                full = f"{inside}.{i}.{prefix}"
                own = [label for label, (lins, _) in parts.items() if label != "chosen" and any(n.startswith(full) for n in lins)]
                if not own:
                    continue
                tested += 1
                best = None
                for label in own:
                    linears, params = self.block(i, parts)
                    self._swap(i, prefix, norms, parts[label], linears, params)
                    kl = self._test(ref, i, self._state(i, linears, params), hs, current)
                    if kl is None or not better(torch.cat(kl), torch.cat(current), self.z):
                        continue
                    if best is None or torch.cat(kl).mean() < torch.cat(best[1]).mean():
                        best = (label, kl)
                if best is not None:
                    self.decisions[full], current = best
                    self.cache.pop(i, None)
            hs = self._run(i, self._chosen_state(i), hs)
            self.cache.pop(i, None)
        return GateOutcome(first, float(torch.cat(current).mean()), dict(self.decisions), tested)

    def _test(self, ref: _Reference, i: int, state: dict, hs: list[torch.Tensor], current: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Per window KL [S] of the model with block i's parameters `state`, or None once the windows run so far put
        the candidate's paired z-score more than FUTILITY_MARGIN below the bar z."""
        got: dict[int, torch.Tensor] = {}
        for stage in stages(len(hs)):
            for w, kl in zip(stage, ref.kl(self._tail(i, state, [hs[w] for w in stage]), stage)):
                got[w] = kl
            if len(got) < len(hs):
                d = torch.cat([current[w] - got[w] for w in got])
                if d.mean() < (self.z - self.FUTILITY_MARGIN) * d.std() / len(d) ** 0.5:
                    return None
        return [got[w] for w in range(len(hs))]

    def annotate(self, rows: list[dict]) -> None:
        """Mark each report row the gate tested with "gate" (kept, or the label taken) and that alternative's numbers."""
        for row in rows:
            taken = [label for prefix, label in self.decisions.items() if row["name"].startswith(prefix)]
            if any(row["name"] in r for r in self.rows.values()):
                row["gate"] = taken[0] if taken else "kept"
            if taken and row["name"] in self.rows.get(taken[0], {}):
                row.update(self.rows[taken[0]][row["name"]])
