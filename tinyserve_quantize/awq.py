"""The quantization loop: block by block, search scales and clips (AWQ) or round to nearest (RTN), and return every
decoder linear as packed tensors plus one report row per linear.

Per block (AWQ):
1. run a copy of the unquantized block (in `compute_dtype`) on its captured inputs, collecting input statistics
   (calibration.run_block); its outputs are the next block's inputs;
2. per scaling group, search alpha on the fit tokens, keep it only if it beats no scaling on held-out tokens, and
   fold the scales into the fp32 block (scale_search);
3. per linear (except q/k), search a clip ratio per group the same way (clip_search);
4. quantize with the chosen bounds and pack (tinyserve_kernels.layout.pack_linear).
After the last block, the gate (clip_gate.py) keeps each sub-block's search result only where it brings the model's
output closer to the unquantized model's on held-out windows than its unclipped or plain-RTN alternative does.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from tinyserve_kernels.layout import dequantize, pack_linear
from tinyserve_quantize.calibration import SiteStats, capture_block_inputs, run_block
from tinyserve_quantize.clip_gate import Candidate, gate_sub_blocks, sub_blocks
from tinyserve_quantize.clip_search import CLIP_MODES, clip_ratios, refit_bounds, search_clip
from tinyserve_quantize.model_families import Family, ScalingGroup
from tinyserve_quantize.quantizer import QuantizationError, QuantSpec, fake_quantize, quantize_weight
from tinyserve_quantize.scale_search import fold_scales, gqa_tie, search_scales, weighted_error

METHODS = ("awq", "rtn")


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
    token_stride: int = 1  # use every n-th token for the Gram matrices
    compute_dtype: torch.dtype = torch.bfloat16  # of the calibration forward passes and the error products

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
class QuantResult:
    linears: dict[str, PackedLinear]  # full module name -> packed weights
    report: list[dict] = field(default_factory=list)  # one row per linear
    # The gate's alternatives (clip_gate.py), name -> (packed, its report fields): clipped linears unclipped (AWQ's
    # scales, plain rounding), and every linear of a scaled or clipped sub-block rounded from its original weights.
    unclipped: dict[str, tuple[PackedLinear, dict]] = field(default_factory=dict)
    rtn: dict[str, tuple[PackedLinear, dict]] = field(default_factory=dict)
    rtn_params: dict[str, torch.Tensor] = field(default_factory=dict)  # the folded norms' weights before folding
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


def rtn_quantize(model: nn.Module, family: Family, spec: QuantSpec, progress: bool = True) -> QuantResult:
    """Plain round-to-nearest of every decoder linear (min/max per group); no calibration."""
    result = QuantResult({})
    layers = model.get_submodule(family.layers)
    for i, block in enumerate(tqdm(layers, desc="RTN", unit="block", disable=not progress)):
        for name in family.linears:
            lin, full = block.get_submodule(name), f"{family.layers}.{i}.{name}"
            result.linears[full] = _pack(lin.weight.detach().float(), lin.bias, spec, full)
            result.report.append(_row(full, lin, spec, layer=i))
    return result


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
    result: QuantResult,
) -> None:
    """Scale (all groups first: a fold into a linear prev rescales that linear's rows, so nothing may be packed
    before every fold is done), then clip and pack every linear of one fp32 block (block i of the model) into
    result. stats: run_block's statistics, keyed by the first linear of each scaling group."""
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
        result.linears[full] = _pack(W, lin.bias, spec, full, lo, hi)

        def held_out_error(lo, hi) -> float:
            """Held-out output error per output element, mapped back to the original input and output spaces."""
            W_q = fake_quantize(W, spec, lo, hi) * out_scale[name][:, None] * inv[None, :]
            return float(weighted_error(W_q - W0[name], st.H_val)) / W.shape[0]

        err_awq = held_out_error(lo, hi)
        err_rtn[name] = float(weighted_error(fake_quantize(W0[name], spec) - W0[name], st.H_val)) / W.shape[0]
        if search.clip_gate and (clipped or refitted):
            result.unclipped[full] = (_pack(W, lin.bias, spec, full), dict(clip_mean_ratio=1.0, clipped_share=0.0, refit_share=0.0,
                                                                            mse_awq=held_out_error(None, None)))
        result.report.append(
            _row(full, lin, spec, layer=i, alpha=alphas[name], clip_mean_ratio=clip_mean, clipped_share=clipped, refit_share=refitted,
                 mse_rtn=err_rtn[name], mse_awq=err_awq, top1pct_mass=_top1_share(st.x_mean))
        )
    if search.clip_gate:
        for prefix, norms in sub_blocks(family):
            part = [n for n in names if n.startswith(prefix)]
            if any(alphas[n] is not None or f"{family.layers}.{i}.{n}" in result.unclipped for n in part):
                for n in part:
                    full = f"{family.layers}.{i}.{n}"
                    result.rtn[full] = (_pack(W0[n], b0[n], spec, full), dict(alpha=None, clip_mean_ratio=1.0, clipped_share=0.0,
                                                                         refit_share=0.0, mse_awq=err_rtn[n]))
                result.rtn_params.update({f"{family.layers}.{i}.{k}": v for k, v in norms0.items() if any(k.startswith(nm + ".") for nm in norms)})


@torch.no_grad()
def awq_quantize(
    model: nn.Module,
    family: Family,
    spec: QuantSpec,
    windows: torch.Tensor,
    search: SearchConfig = SearchConfig(),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> QuantResult:
    """model: the fp32 *ForCausalLM, modified in place (scales folded into norms and linears). windows [B, S] ids."""
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("awq_quantize needs the model in fp32 (folding and searching are done in fp32)")
    result = QuantResult({})
    layers = model.get_submodule(family.layers)
    inputs, block_kwargs = capture_block_inputs(model, layers, windows)  # [B, S, H] fp32
    for i, block in enumerate(tqdm(layers, desc="AWQ", unit="block", disable=not progress)):
        runner = copy.deepcopy(block).to(search.compute_dtype)
        sites = {g.linears[0]: runner.get_submodule(g.linears[0]) for g in family.groups}
        inputs, stats = run_block(runner, inputs, block_kwargs, sites, search.holdout_every, search.token_stride)
        del runner

        quantize_block(block, i, family, spec, search, stats, result)
    if search.clip_gate and (result.unclipped or result.rtn):
        run_clip_gate(model, family, spec, windows, search, result, progress, log)
    result.unclipped.clear()
    result.rtn.clear()
    result.rtn_params.clear()
    return result


def run_clip_gate(model, family, spec, windows, search, result, progress, log) -> None:
    """Run the gate (clip_gate.py) on held-out calibration windows (calibration.run_block's split), apply its
    decisions to the result and to the model's folded norms, and record them in the report."""
    B = len(windows)
    held = [i for i in range(B) if search.holdout_every and i % search.holdout_every == search.holdout_every - 1] or list(range(B))
    n = min(search.gate_windows, len(held))
    picks = [held[round(j * len(held) / n)] for j in range(n)]  # spread over the held-out windows
    bar = (lambda it: tqdm(it, desc="gate", unit="block")) if progress else None
    candidates = [Candidate("unclipped", {k: p for k, (p, _) in result.unclipped.items()}),
                  Candidate("rtn", {k: p for k, (p, _) in result.rtn.items()}, result.rtn_params)]
    outcome = gate_sub_blocks(model, family, result.linears, candidates, windows[picks], spec.group_size, search.compute_dtype,
                              search.gate_z, bar)
    fields = {"unclipped": result.unclipped, "rtn": result.rtn}
    for prefix, (label, params) in outcome.decisions.items():
        for k, v in params.items():
            model.get_parameter(k).data.copy_(v)  # the export writes the norms from the model
    for row in result.report:
        taken = [label for prefix, (label, _) in outcome.decisions.items() if row["name"].startswith(prefix)]
        if row["name"] in result.unclipped or row["name"] in result.rtn:
            row["gate"] = taken[0] if taken else "kept"
        if taken and row["name"] in fields[taken[0]]:
            row.update(fields[taken[0]][row["name"]][1])
    counts = {label: sum(1 for lb, _ in outcome.decisions.values() if lb == label) for label in ("unclipped", "rtn")}
    result.gate = {"windows": len(picks), "kl_search": outcome.kl_search, "kl_final": outcome.kl_final,
                   "tested": outcome.tested, "decisions": {p: lb for p, (lb, _) in outcome.decisions.items()}}
    log(f"gate: KL to fp {outcome.kl_search:.5f} -> {outcome.kl_final:.5f} nats/token on {len(picks)} held-out windows; "
        f"of {outcome.tested} sub-blocks, {counts['unclipped']} went unclipped, {counts['rtn']} back to RTN")


@torch.no_grad()
def dequantize_into(model: nn.Module, result: QuantResult, group_size: int) -> None:
    """Replace every quantized linear's weight by its dequantized packed weights (the fake-quantized model)."""
    for name, p in result.linears.items():
        lin = model.get_submodule(name)
        W = dequantize(p.qweight, p.qzeros, p.scales, group_size)  # [K, N] fp16
        lin.weight.data = W.t().to(lin.weight.dtype).contiguous()
