"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"):
round a linear's weights one input column at a time and push each column's rounding error onto the columns not yet
rounded, weighted by the inverse Hessian of the layer's output error.

For a linear W [N, K] with calibration inputs X [T, K], the output error of a weight error dW is tr(dW H dW^T) / 2
with H = 2 X^T X. calibration.run_block already accumulates X^T X / T per input site for AWQ's searches; GPTQ takes
that matrix as its Hessian (the factor 2 T cancels against the relative damping below), so no statistics are
collected twice. The rows of W are independent under a shared H, so linears that read the same input (q/k/v,
gate/up) are stacked and quantized in one pass.

The algorithm, per weight matrix:
1. dead input channels (H_kk = 0: never active on the calibration set) get H_kk = 1, which decouples them: their
   weights are rounded like RTN and neither receive nor send error. (The reference implementation also zeroes their
   weights; we keep them, since a channel silent on the calibration text may not be silent on the user's.)
2. damping: H += percdamp * mean(diag H) * I, so H is safely positive definite;
3. U = upper Cholesky factor of H^-1 (H^-1 = U^T U): row k of U holds how the error of column k spreads onto the
   columns after k once columns < k are fixed (the "inverse Cholesky" form: no H^-1 downdate per column);
4. columns in blocks of `block_size`: inside a block, one column at a time, q_k = Q(w_k), e_k = (w_k - q_k) / U_kk,
   w_j -= e_k U_kj for the block's later columns j (a rank-1 update, the only per-column Python loop); after the block,
   one GEMM applies the block's errors to every column after it ("lazy batch" updates).

Groups and grid: the quantizer is quantizer.py's asymmetric per-group one, with the same groups of G consecutive
input channels (in the original column order) as RTN and AWQ, so the result packs into the same layout. A group's
scale and zero are taken from its weights' min and max when GPTQ reaches the group's first column, i.e. after the
errors of the groups before it were pushed into it (as the reference does). With act_order, columns are visited in
order of decreasing H_kk, so one group's columns are no longer visited together; then every group's grid is fixed
before the loop from the original weights ("static groups"), and the file's groups stay contiguous.
"""

from dataclasses import dataclass, replace

import torch
from torch import nn

from tinyserve_kernels.layout import pack_linear
from tinyserve_quantize.awq import BlockOutput, PackedLinear, SearchConfig, _row, _scaling_tie, block_params
from tinyserve_quantize.calibration import SiteStats
from tinyserve_quantize.clip_search import clip_ratios, refit_bounds, search_clip
from tinyserve_quantize.model_families import Family
from tinyserve_quantize.quantizer import QuantizationError, QuantSpec, fake_quantize, grouped, one_thread, params_from_bounds
from tinyserve_quantize.scale_search import fold_scales, search_scales, weighted_error

CALIB_INPUTS = ("quantized", "fp")
MAX_DAMP_TRIES = 6  # damping grows 10x per failed Cholesky factorization


@dataclass(frozen=True)
class GPTQConfig:
    percdamp: float = 0.01  # damping, as a share of the Hessian's mean diagonal
    block_size: int = 128  # columns per lazy-batch block
    # visit columns by decreasing H_kk (groups then use static grids); None: the method's default (resolved)
    act_order: bool | None = None
    # Where block i's calibration inputs come from: "quantized": the outputs of blocks 0..i-1 after quantization (the
    # GPTQ reference), so each block corrects for the error of the blocks before it; "fp": the unquantized model's.
    calib_inputs: str = "quantized"
    awq_clip: bool = False  # awq-gptq: fix each group's grid to AWQ's searched clip (static) instead of min/max
    # v_proj's rows against the Gram of the attention-averaged inputs, per key/value head (value_stats.py), instead
    # of the inputs' own
    value_hessian: bool = False
    # calibrate in fp32 (forward passes and the search's products) whatever SearchConfig.compute_dtype says: bf16
    # forward passes cost awq-gptq-attn much of its gain on a second text (BENCHMARKS.md, issue 20)
    fp32: bool = False

    def __post_init__(self):
        if not 0 <= self.percdamp < 1:
            raise QuantizationError(f"percdamp {self.percdamp} must lie in [0, 1)")
        if self.block_size < 1:
            raise QuantizationError("the GPTQ block size must be positive")
        if self.calib_inputs not in CALIB_INPUTS:
            raise QuantizationError(f"calibration inputs {self.calib_inputs!r}; choose one of {list(CALIB_INPUTS)}")

    def resolved(self, method: str) -> "GPTQConfig":
        """The settings `method` runs with. awq-gptq-attn adds the attention statistics, fp32 calibration (where bf16
        is native: more time, measured nowhere yet) and, unless told otherwise, act order (2-5 points more of RTN's
        loss recovered on both models and texts, for 1-3% more time; BENCHMARKS.md, issue 20); the other methods keep
        file order and the search's dtype, so the default recipe's bytes do not move."""
        attn = method == "awq-gptq-attn"
        return replace(self, value_hessian=self.value_hessian or attn, fp32=self.fp32 or attn,
                       act_order=attn if self.act_order is None else self.act_order)


@dataclass
class GPTQWeight:
    codes: torch.Tensor  # [N, K] int32
    zeros: torch.Tensor  # [N, K // G] int32
    scales: torch.Tensor  # [N, K // G] fp16
    damp: float  # the damping added to H's diagonal (relative to its mean diagonal)
    dead: int  # input channels with H_kk = 0

    def dequantized(self, G: int) -> torch.Tensor:
        """[N, K] fp32: (q - z) * s, bit-identical to the packed file's reference dequantization."""
        z = self.zeros.float().repeat_interleave(G, dim=1)
        return (self.codes.float() - z) * self.scales.float().repeat_interleave(G, dim=1)


def inverse_cholesky(H: torch.Tensor, percdamp: float, name: str = "") -> tuple[torch.Tensor, torch.Tensor, float]:
    """H [K, K] -> (U [K, K] fp32 upper triangular with H_damped^-1 = U^T U, dead [K] bool, relative damping used).

    Computed in fp64 (K is at most a few thousand here); if the damped H is still not positive definite
    (rounding in a nearly singular H), the damping grows tenfold and the factorization is retried."""
    H = H.double().clone()
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1
    mean = float(diag.mean())
    rel = percdamp
    eye = torch.eye(len(H), dtype=H.dtype)
    for _ in range(MAX_DAMP_TRIES):
        # With J the order reversal, J H J = M M^T (lower M) gives H = R R^T with R = J M J upper triangular, so
        # H^-1 = R^-T R^-1 and U = R^-1 (positive diagonal) is H^-1's upper Cholesky factor: one factorization and
        # one triangular solve, several times faster here than forming H^-1 and factoring it again.
        M, info = torch.linalg.cholesky_ex((H + (rel * mean) * eye).flip(0, 1))
        if int(info) == 0:
            return torch.linalg.solve_triangular(M.flip(0, 1), eye, upper=True).float(), dead, rel
        rel = max(10 * rel, 1e-6)
    where = f"{name}: " if name else ""
    raise QuantizationError(f"{where}the calibration Hessian is not positive definite even with damping {rel / 10:g}; "
                            "use more calibration text")


def _check_blocks(G: int, K: int, block_size: int) -> None:
    # A group's grid is read when its first column is reached: its columns must then hold every error update meant
    # for them, which holds when groups never straddle a block boundary partway (G | B), or start at block starts.
    if not (block_size % G == 0 or G % block_size == 0 or G == K):
        raise QuantizationError(f"GPTQ block size {block_size} and group size {G}: one must divide the other")


@torch.no_grad()
def gptq_weight(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    cfg: GPTQConfig = GPTQConfig(),
    grid: tuple[torch.Tensor, torch.Tensor] | None = None,
    name: str = "",
) -> GPTQWeight:
    """Quantize W [N, K] against the Hessian H [K, K] of its input.

    grid: optional fixed (lo, hi) bounds [N, K // G] per group (e.g. AWQ's clipped ranges); without it, groups take
    their min and max when reached (or, with act_order, from the original weights). Returns codes/zeros/scales in
    quantize_weight's format, ready for pack_linear."""
    # The per-column loop is ~10 tiny ops per column: one thread (measured at load 5: a 3072 x 576 weight took 12.2 s
    # with 2 threads, 0.08 s with 1).
    with one_thread():
        return _gptq_weight(W, H, spec, cfg, grid, name)


def _gptq_weight(W, H, spec, cfg, grid, name) -> GPTQWeight:
    N, K = W.shape
    G = spec.group(K, name)
    if H.shape != (K, K):
        raise ValueError(f"{name}: Hessian of shape {tuple(H.shape)} for a weight of shape {(N, K)}")
    # act_order: visit columns by decreasing H_kk (dead channels, H_kk = 0, last); U is then H's factor in that order.
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if cfg.act_order else torch.arange(K)
    U, dead, damp = inverse_cholesky(H[perm][:, perm] if cfg.act_order else H, cfg.percdamp, name)
    static = cfg.act_order or grid is not None
    if not static:
        _check_blocks(G, K, cfg.block_size)
    ng = K // G
    scale = torch.empty(N, ng)
    zero = torch.empty(N, ng)
    if static:
        wg = grouped(W.float(), G)
        lo, hi = grid if grid is not None else (wg.amin(-1), wg.amax(-1))
        scale, zero = params_from_bounds(lo, hi, spec.qmax)

    group_of = perm // G  # [K] the group of the column visited k-th
    # Work on the transpose [K, N]: one column of W is then one contiguous row.
    Wt = W.float().t()[perm].contiguous()
    codes = torch.empty(K, N)
    qmax = spec.qmax
    for i1 in range(0, K, cfg.block_size):
        i2 = min(i1 + cfg.block_size, K)
        Wb = Wt[i1:i2]  # [B, N] view: updated in place
        Ub = U[i1:i2, i1:i2]  # [B, B]
        Eb = torch.empty(i2 - i1, N)  # scaled errors of the block's columns
        for i in range(i2 - i1):
            k = i1 + i
            g = int(group_of[k])
            if not static and k % G == 0:  # first column of a group: its grid from the current (updated) weights
                cols = Wt[k : k + G]  # [G, N]
                scale[:, g], zero[:, g] = params_from_bounds(cols.amin(0), cols.amax(0), qmax)
            s, z = scale[:, g], zero[:, g]
            w = Wb[i]
            q = (w / s).round_().add_(z).clamp_(0, qmax)  # codes_for's formula on one column
            codes[k] = q
            err = w.sub((q - z).mul_(s)).div_(Ub[i, i])
            Eb[i] = err
            if i + 1 < i2 - i1:
                Wb[i + 1 :].addr_(Ub[i, i + 1 :], err, alpha=-1)  # [B - i - 1, N] -= U[k, later]^T e_k
        if i2 < K:
            Wt[i2:].sub_(U[i1:i2, i2:].t() @ Eb)  # lazy batch update of every later column: [K - i2, N]
    out = torch.empty_like(codes)
    out[perm] = codes
    return GPTQWeight(out.t().to(torch.int32).contiguous(), zero.to(torch.int32), scale.half(), damp, int(dead.sum()))


def _cat(parts: list[GPTQWeight]) -> GPTQWeight:
    """GPTQ results of consecutive row ranges of one weight -> one result."""
    return GPTQWeight(torch.cat([p.codes for p in parts]), torch.cat([p.zeros for p in parts]),
                      torch.cat([p.scales for p in parts]), max(p.damp for p in parts), max(p.dead for p in parts))


def value_rows(family: Family, names: tuple[str, ...], lins: list[nn.Module], st: SiteStats) -> list[tuple[slice, torch.Tensor]]:
    """The rows of v_proj's key/value heads in the concatenation of a group's weights, each with its attention-averaged
    inputs' Gram [K, K] (st.H_value, value_stats.py); [] when the group has no v_proj or no such statistics."""
    v_name = f"{family.attention}.v_proj"
    if st.H_value is None or v_name not in names:
        return []
    start = sum(lin.out_features for n, lin in zip(names, lins) if names.index(n) < names.index(v_name))
    hd = lins[names.index(v_name)].out_features // len(st.H_value)
    return [(slice(start + g * hd, start + (g + 1) * hd), H) for g, H in enumerate(st.H_value)]


def awq_scale_block(
    block: nn.Module, family: Family, spec: QuantSpec, search: SearchConfig, stats: dict[str, SiteStats]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float | None]]:
    """AWQ's scale step on one fp32 block, as in awq.quantize_block: per scaling group, search alpha (kept only where
    it beats no scaling on held-out tokens) and fold the scales into the block. Returns per linear its input scale
    [K] (its input is now x / s), output scale [N] (its output is now y / o: it is the prev of a scaled group) and
    alpha (None: unscaled)."""
    in_scale = {n: torch.ones(block.get_submodule(n).in_features) for n in family.linears}
    out_scale = {n: torch.ones(block.get_submodule(n).out_features) for n in family.linears}
    alphas: dict[str, float | None] = {n: None for n in family.linears}
    if not search.scale:
        return in_scale, out_scale, alphas
    for group in family.groups:
        lins = [block.get_submodule(n) for n in group.linears]
        scalable, tie = _scaling_tie(block, group, search.gqa_vo)
        if not scalable:
            continue
        choice = search_scales([lin.weight for lin in lins], stats[group.linears[0]], spec, search.n_grid,
                               search.duo_scaling, search.holdout_gate, search.compute_dtype, tie)
        if choice.alpha is None:
            continue
        fold_scales(block.get_submodule(group.prev), lins, choice.scales, tie)
        for n in group.linears:
            in_scale[n], alphas[n] = choice.scales, choice.alpha
        if group.prev in out_scale:
            s = choice.scales
            out_scale[group.prev] = s if tie is None else torch.zeros(len(out_scale[group.prev])).index_copy_(0, tie, s)
    return in_scale, out_scale, alphas


def _awq_grid(W: torch.Tensor, H_fit: torch.Tensor, H_val: torch.Tensor, spec: QuantSpec, search: SearchConfig):
    """AWQ's clip search (and step refit) on scaled weights W [N, K]: fixed (lo, hi) [N, K // G] per group."""
    clip = search_clip(W, H_fit, H_val, spec, clip_ratios(search.clip_grid, search.max_shrink), search.clip_mode,
                       search.holdout_gate)
    lo, hi = clip.lo, clip.hi
    if search.refit:
        lo, hi, _ = refit_bounds(W, lo, hi, H_fit, H_val, spec, search.holdout_gate)
    return lo, hi


@torch.no_grad()
def gptq_block(
    block: nn.Module,
    i: int,
    family: Family,
    spec: QuantSpec,
    cfg: GPTQConfig,
    stats: dict[str, SiteStats],
    search: SearchConfig = SearchConfig(),
    awq: bool = False,
) -> BlockOutput:
    """GPTQ (awq: AWQ + GPTQ, with search's scale settings) of every linear of one fp32 block (block i of the model).
    Leaves the block's linears holding their dequantized weights (in the scaled space when AWQ scaled them)."""
    W0 = {n: block.get_submodule(n).weight.detach().clone() for n in family.linears}  # [N, K] before any fold
    if awq:
        in_scale, out_scale, alphas = awq_scale_block(block, family, spec, search, stats)
    else:
        in_scale = {n: torch.ones(W0[n].shape[1]) for n in family.linears}
        out_scale = {n: torch.ones(W0[n].shape[0]) for n in family.linears}
        alphas = {}
    out = BlockOutput(i, {}, block_params(block, i, family), [])
    for group in family.groups:
        names = group.linears
        lins = [block.get_submodule(n) for n in names]
        full = [f"{family.layers}.{i}.{n}" for n in names]
        st = stats[names[0]]
        inv = 1 / in_scale[names[0]]  # every linear of a scaling group reads the same scaled input x / s
        H_fit, H_val = st.H_fit * inv[:, None] * inv[None, :], st.H_val * inv[:, None] * inv[None, :]
        W = torch.cat([lin.weight.detach().float() for lin in lins])  # [sum N, K]
        grid = None
        if awq and cfg.awq_clip and search.clip:
            bounds = [_awq_grid(lin.weight.detach().float(), H_fit, H_val, spec, search)
                      if search.clip_qk or n not in family.no_clip else None for n, lin in zip(names, lins)]
            if any(b is not None for b in bounds):
                wg = [grouped(lin.weight.detach().float(), spec.group(lin.in_features)) for lin in lins]
                bounds = [b if b is not None else (g.amin(-1), g.amax(-1)) for b, g in zip(bounds, wg)]
                grid = (torch.cat([b[0] for b in bounds]), torch.cat([b[1] for b in bounds]))
        label = full[0] if len(full) == 1 else f"{full[0]} (+{len(full) - 1} sharing its input)"
        rows = value_rows(family, names, lins, st) if cfg.value_hessian else []
        if rows:
            # v_proj's rows, one key/value head at a time, against its attention-averaged inputs' Gram (scaled too)
            first, last = rows[0][0].start, rows[-1][0].stop
            parts = [(slice(0, first), H_fit)] + [(r, Hr * inv[:, None] * inv[None, :]) for r, Hr in rows]
            parts.append((slice(last, W.shape[0]), H_fit))
            q = _cat([gptq_weight(W[r], Hr, spec, cfg, None if grid is None else (grid[0][r], grid[1][r]), name=label)
                      for r, Hr in parts if r.stop > r.start])
        else:
            q = gptq_weight(W, H_fit, spec, cfg, grid, name=label)
        G = spec.group(W.shape[1])
        Wq = q.dequantized(G)
        row = 0
        for n, lin, name in zip(names, lins, full):
            rows = slice(row, row + lin.out_features)
            row += lin.out_features
            qweight, qzeros, scales = pack_linear(q.codes[rows], q.zeros[rows], q.scales[rows])
            bias = None if lin.bias is None else lin.bias.detach().half()
            out.linears[name] = PackedLinear(qweight, qzeros, scales, bias)
            lin.weight.data.copy_(Wq[rows])
            # Held-out output error per output element, in the original input and output spaces.
            Wq_orig = Wq[rows] * out_scale[n][:, None] * inv[None, :]
            err = float(weighted_error(Wq_orig - W0[n], st.H_val, search.compute_dtype)) / lin.out_features
            err_rtn = float(weighted_error(fake_quantize(W0[n], spec) - W0[n], st.H_val, search.compute_dtype)) / lin.out_features
            extra = {"alpha": alphas[n]} if awq else {}
            out.report.append(_row(name, lin, spec, layer=i, **extra, damp=q.damp, dead_channels=q.dead,
                                   mse_rtn=err_rtn, mse_gptq=err))
    return out
