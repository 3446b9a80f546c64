"""AWQ and RTN of one decoder block (blockwise.py walks the blocks): search scales and clips, and return the block's
linears as packed tensors, its folded norms and one report row per linear.

Per block (AWQ), given run_block's input statistics of the unquantized block:
1. per scaling group, search alpha on the fit tokens, keep it only if it beats no scaling on held-out tokens, and
   fold the scales into the fp32 block (scale_search);
2. per linear (except q/k), search a clip ratio per group the same way (clip_search);
3. quantize with the chosen bounds and pack (tinyserve_kernels.layout.pack_linear);
4. for the gate (clip_gate.py), which runs after the last block: the sub-blocks' unclipped and plain-RTN alternatives.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from tinyserve_kernels.layout import dequantize, pack_linear
from tinyserve_quantize.calibration import SiteStats
from tinyserve_quantize.clip_search import CLIP_MODES, clip_ratios, refit_bounds, search_clip
from tinyserve_quantize.model_families import Family, ScalingGroup, sub_blocks
from tinyserve_quantize.quantizer import QuantizationError, QuantSpec, fake_quantize, quantize_weight
from tinyserve_quantize.scale_search import fold_scales, gqa_tie, search_scales, weighted_error


def native_compute_dtype() -> torch.dtype:
    """bf16 where the hardware computes it natively (a CUDA GPU; a CPU with AVX-512 or AMX, on which oneDNN runs bf16),
    else fp32: an AVX2-only CPU emulates bf16 matmuls (a Zen 3 EPYC: 19 GFLOP/s in bf16, 157 in fp32; BENCHMARKS.md)."""
    if torch.cuda.is_available() or (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return torch.bfloat16
    return torch.float32


@dataclass(frozen=True)
class SearchConfig:
    n_grid: int = 20  # alphas 0, 1/20, ..., 19/20
    duo_scaling: bool = False  # s = x_mean^a / w_mean^(1-a) instead of x_mean^a
    scale: bool = True  # False: skip the scale search (clip only; an ablation)
    clip: bool = True
    clip_qk: bool = False  # also clip q/k (AutoAWQ never does)
    gqa_vo: bool = True  # scale v_proj -> o_proj under grouped-query attention too, one scale per v channel
    refit: bool = True  # after clipping, refit each group's step by least squares (clip_search.refit_bounds)
    clip_mode: str = "range"
    clip_grid: int = 20  # ratios 1 - i / clip_grid ...
    max_shrink: float = 0.5  # ... for i < max_shrink * clip_grid: 1.00 down to 0.55 in 10 steps
    holdout_every: int = 4  # every 4th calibration window is held out to check each choice; 0: no held-out set
    holdout_gate: bool = True  # keep a scale / clip only where it beats none on the held-out windows
    clip_gate: bool = True  # test each sub-block's result against unclipped / RTN by the model's KL to fp (clip_gate.py)
    gate_windows: int = 8  # held-out calibration windows the clip gate runs on
    gate_z: float = 2.0  # the gate takes a candidate only when the KL falls by more than gate_z standard errors
    gate_cache_bytes: int = 2 * 2**30  # dequantized blocks the gate keeps in memory (the rest re-read from its spill)
    token_stride: int = 1  # use every n-th token for the Gram matrices
    # of the calibration forward passes and the error products
    compute_dtype: torch.dtype = field(default_factory=native_compute_dtype)

    def __post_init__(self):
        if self.clip_mode not in CLIP_MODES:
            raise QuantizationError(f"clip mode {self.clip_mode!r}; choose one of {list(CLIP_MODES)}")
        if self.holdout_every == 1 or self.holdout_every < 0:
            raise QuantizationError("holdout_every must be 0 (no held-out windows) or at least 2")
        if self.token_stride < 1 or self.n_grid < 1 or self.gate_windows < 1:
            raise QuantizationError("token_stride, n_grid and gate_windows must be positive")


@dataclass
class PackedLinear:
    qweight: torch.Tensor  # [K, N // 8] int32
    qzeros: torch.Tensor  # [K // G, N // 8] int32
    scales: torch.Tensor  # [K // G, N] fp16
    bias: torch.Tensor | None  # [N]


@dataclass
class Alternative:
    """Another way to quantize some of a block's sub-blocks, for the gate (clip_gate.py): "unclipped" (AWQ's scales,
    plain rounding) for clipped linears, "rtn" (original weights and norms, plain rounding) for every linear of a scaled
    or clipped sub-block."""

    linears: dict[str, PackedLinear] = field(default_factory=dict)  # full linear name -> packed
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # full parameter name -> value (norms before folding)
    rows: dict[str, dict] = field(default_factory=dict)  # full linear name -> its report fields under this alternative


@dataclass
class BlockOutput:
    """What quantizing one decoder block gives: what the export writes for it, and the gate's alternatives."""

    index: int
    linears: dict[str, PackedLinear]  # full linear name -> packed
    params: dict[str, torch.Tensor]  # the block's other parameters (norms, scales folded in), full name -> fp32
    report: list[dict]  # one row per linear
    alternatives: dict[str, Alternative] = field(default_factory=dict)  # "unclipped" / "rtn" -> Alternative

    def cpu(self) -> "BlockOutput":
        """A copy with every tensor in host memory (the sinks and the gate's spill write from there)."""
        def lin(p: PackedLinear) -> PackedLinear:
            return PackedLinear(p.qweight.cpu(), p.qzeros.cpu(), p.scales.cpu(), None if p.bias is None else p.bias.cpu())

        def alt(a: Alternative) -> Alternative:
            return Alternative({n: lin(p) for n, p in a.linears.items()}, {n: t.cpu() for n, t in a.params.items()}, a.rows)

        return BlockOutput(self.index, {n: lin(p) for n, p in self.linears.items()}, {n: t.cpu() for n, t in self.params.items()},
                           self.report, {k: alt(a) for k, a in self.alternatives.items()})


@dataclass
class QuantResult:
    linears: dict[str, PackedLinear]  # full module name -> packed weights
    report: list[dict] = field(default_factory=list)  # one row per linear
    gate: dict | None = None  # the gate's outcome (KL before and after, decision per sub-block), for the report


def check_model(model: nn.Module, family: Family, spec: QuantSpec) -> None:
    """Fail before any work when a linear cannot be stored: a group size that does not divide K, or N % 8 != 0."""
    for i, block in enumerate(model.get_submodule(family.layers)):
        for name in family.linears:
            lin = block.get_submodule(name)
            full = f"{family.layers}.{i}.{name}"
            spec.group(lin.in_features, full)
            if lin.out_features % 8:
                raise QuantizationError(f"{full}: out_features {lin.out_features} is not a multiple of 8, which the packed layout needs")


def _pack(W: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec, name: str, lo=None, hi=None) -> PackedLinear:
    codes, zeros, scales = quantize_weight(W, spec, lo, hi, name)
    qweight, qzeros, scales = pack_linear(codes, zeros, scales)
    return PackedLinear(qweight, qzeros, scales, None if bias is None else bias.detach().half())


def _row(name: str, lin: nn.Linear, spec: QuantSpec, **extra) -> dict:
    N, K = lin.out_features, lin.in_features
    ng = K // spec.group(K)
    bytes_fp16 = 2 * N * K
    bytes_packed = N * K // 2 + 4 * ng * N // 8 + 2 * ng * N  # qweight + qzeros + fp16 scales (4-bit containers)
    return {"name": name, "shape": [N, K], "bytes_fp16": bytes_fp16, "bytes_packed": bytes_packed, **extra}


def block_params(block: nn.Module, i: int, family: Family) -> dict[str, torch.Tensor]:
    """The block's parameters that are not quantized linears (its norms), full name -> fp32 copy."""
    inside = tuple(n + "." for n in family.linears)
    return {f"{family.layers}.{i}.{n}": p.detach().float().clone() for n, p in block.named_parameters() if not n.startswith(inside)}


def rtn_block(block: nn.Module, i: int, family: Family, spec: QuantSpec) -> BlockOutput:
    """Plain round-to-nearest of every linear of block i (min/max per group); no calibration."""
    out = BlockOutput(i, {}, block_params(block, i, family), [])
    for name in family.linears:
        lin, full = block.get_submodule(name), f"{family.layers}.{i}.{name}"
        out.linears[full] = _pack(lin.weight.detach().float(), lin.bias, spec, full)
        out.report.append(_row(full, lin, spec, layer=i))
    return out


def _top1_share(x_mean: torch.Tensor) -> float:
    """Share of the activation mass (sum of mean |x|) carried by the top 1% of input channels."""
    k = max(1, round(0.01 * x_mean.numel()))
    return float(x_mean.topk(k).values.sum() / x_mean.sum().clamp(min=1e-12))


def _scaling_tie(block: nn.Module, group: ScalingGroup, gqa: bool) -> tuple[bool, torch.Tensor | None]:
    """(can the group be scaled, channel tie for search_scales / fold_scales)."""
    if group.prev is None:
        return False, None
    if not group.needs_matching_shapes:
        return True, None
    prev = block.get_submodule(group.prev)
    K = block.get_submodule(group.linears[0]).in_features
    if prev.out_features == K:
        return True, None
    attn = block.get_submodule(group.prev.rsplit(".", 1)[0])
    head_dim = getattr(attn, "head_dim", None)
    if not gqa or not head_dim or K % head_dim or prev.out_features % head_dim:
        return False, None
    n_heads, n_kv = K // head_dim, prev.out_features // head_dim
    if n_heads % n_kv:
        return False, None
    return True, gqa_tie(n_heads, n_kv, head_dim)


@torch.no_grad()
def quantize_block(
    block: nn.Module,
    i: int,
    family: Family,
    spec: QuantSpec,
    search: SearchConfig,
    stats: dict[str, SiteStats],
    alternatives: bool = False,
) -> BlockOutput:
    """Scale (all groups first: a fold into a linear prev rescales that linear's rows, so nothing may be packed
    before every fold is done), then clip and pack every linear of one fp32 block (block i of the model), which is
    left holding its folded, unquantized weights. stats: run_block's statistics, keyed by the first linear of each
    scaling group. alternatives: also give the gate's alternatives (clip_gate.py)."""
    ratios = clip_ratios(search.clip_grid, search.max_shrink)
    names = family.linears
    W0 = {n: block.get_submodule(n).weight.detach().clone() for n in names}  # [N, K] before any fold
    b0 = {n: None if block.get_submodule(n).bias is None else block.get_submodule(n).bias.detach().clone() for n in names}
    norms0 = {f"{g.prev}.{k}": v.detach().clone() for g in family.groups if g.prev and g.prev not in names
              for k, v in block.get_submodule(g.prev).named_parameters()}
    in_scale = {n: torch.ones(W0[n].shape[1]) for n in names}  # the linear's input is now x / in_scale
    out_scale = {n: torch.ones(W0[n].shape[0]) for n in names}  # its output is now y / out_scale
    site = {n: g.linears[0] for g in family.groups for n in g.linears}
    alphas, err_rtn = {}, {}  # per linear: its group's alpha; RTN's held-out output error
    out = BlockOutput(i, {}, {}, [])
    unclipped, rtn = Alternative(), Alternative()
    for group in family.groups:
        lins = [block.get_submodule(n) for n in group.linears]
        alpha = None
        scalable, tie = _scaling_tie(block, group, search.gqa_vo)
        if search.scale and scalable:
            choice = search_scales([lin.weight for lin in lins], stats[group.linears[0]], spec, search.n_grid,
                                   search.duo_scaling, search.holdout_gate, search.compute_dtype, tie)
            if choice.alpha is not None:
                alpha = choice.alpha
                fold_scales(block.get_submodule(group.prev), lins, choice.scales, tie)
                for n in group.linears:
                    in_scale[n] = choice.scales
                if group.prev in out_scale:
                    out_scale[group.prev] = choice.scales if tie is None else torch.zeros(len(out_scale[group.prev])).index_copy_(0, tie, choice.scales)
        for n in group.linears:
            alphas[n] = alpha

    for name in names:
        lin, full, st = block.get_submodule(name), f"{family.layers}.{i}.{name}", stats[site[name]]
        W, s = lin.weight.detach(), in_scale[name]
        inv = 1 / s
        lo = hi = None
        clip_mean, clipped, refitted = 1.0, 0.0, 0.0
        if search.clip and (search.clip_qk or name not in family.no_clip):
            # The Gram matrices of the scaled input x / s.
            H_fit, H_val = st.H_fit * inv[:, None] * inv[None, :], st.H_val * inv[:, None] * inv[None, :]
            clip = search_clip(W, H_fit, H_val, spec, ratios, search.clip_mode, search.holdout_gate)
            lo, hi = clip.lo, clip.hi
            clip_mean, clipped = float(clip.ratio.mean()), float((clip.ratio < 1).float().mean())
            if search.refit:
                lo, hi, refitted = refit_bounds(W, lo, hi, H_fit, H_val, spec, search.holdout_gate)
        out.linears[full] = _pack(W, lin.bias, spec, full, lo, hi)

        def held_out_error(lo, hi) -> float:
            """Held-out output error per output element, mapped back to the original input and output spaces."""
            W_q = fake_quantize(W, spec, lo, hi) * out_scale[name][:, None] * inv[None, :]
            return float(weighted_error(W_q - W0[name], st.H_val, search.compute_dtype)) / W.shape[0]

        err_awq = held_out_error(lo, hi)
        err_rtn[name] = float(weighted_error(fake_quantize(W0[name], spec) - W0[name], st.H_val, search.compute_dtype)) / W.shape[0]
        if alternatives and (clipped or refitted):
            unclipped.linears[full] = _pack(W, lin.bias, spec, full)
            unclipped.rows[full] = dict(clip_mean_ratio=1.0, clipped_share=0.0, refit_share=0.0, mse_awq=held_out_error(None, None))
        out.report.append(
            _row(full, lin, spec, layer=i, alpha=alphas[name], clip_mean_ratio=clip_mean, clipped_share=clipped, refit_share=refitted,
                 mse_rtn=err_rtn[name], mse_awq=err_awq, top1pct_mass=_top1_share(st.x_mean))
        )
    out.params = block_params(block, i, family)
    if alternatives:
        for prefix, norms in sub_blocks(family):
            part = [n for n in names if n.startswith(prefix)]
            if any(alphas[n] is not None or f"{family.layers}.{i}.{n}" in unclipped.linears for n in part):
                for n in part:
                    full = f"{family.layers}.{i}.{n}"
                    rtn.linears[full] = _pack(W0[n], b0[n], spec, full)
                    rtn.rows[full] = dict(alpha=None, clip_mean_ratio=1.0, clipped_share=0.0, refit_share=0.0, mse_awq=err_rtn[n])
                rtn.params.update({f"{family.layers}.{i}.{k}": v for k, v in norms0.items() if any(k.startswith(nm + ".") for nm in norms)})
        out.alternatives = {label: alt for label, alt in (("unclipped", unclipped), ("rtn", rtn)) if alt.linears}
    return out


@torch.no_grad()
def dequantize_into(model: nn.Module, result: QuantResult, group_size: int) -> None:
    """Replace every quantized linear's weight by its dequantized packed weights (the fake-quantized model)."""
    for name, p in result.linears.items():
        lin = model.get_submodule(name)
        W = dequantize(p.qweight, p.qzeros, p.scales, group_size)  # [K, N] fp16
        lin.weight.data = W.t().to(lin.weight.dtype).contiguous()
