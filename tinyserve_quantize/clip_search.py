"""Per-group weight clipping: pick the quantization range of each group of G input channels of one output row.

A group's share of the output error is d^T H_gg d, with d [G] its weight error and H_gg [G, G] the diagonal block
of the input Gram matrix for its channels (cross-group terms are ignored, as in AutoAWQ's per-group search). So all
ratios for all groups are scored on every calibration token with one batched [G, G] product per group column.

Three ways to shrink a group's range by a ratio r (1.00 down to 0.55 in 10 steps by default):
- "range": lo = r * min, hi = r * max (both ends move toward 0; the zero point stays where it was);
- "sym":   AutoAWQ's clamp of the weights to [-r * max|w|, r * max|w|] (only the longer side moves at first);
- "range2d": lo = r1 * min, hi = r2 * max for every pair of ratios (R^2 candidates; the zero point moves too).
"""

from dataclasses import dataclass

import torch

from tinyserve_quantize.quantizer import (
    QuantSpec, codes_for, fake_quantize_grouped, grouped, map_chunks, params_from_bounds
)

CLIP_MODES = ("range", "sym", "range2d")
# Elements of one batch of candidate weights [R, rows, K] (4 MiB in fp32). Every row is scored on its own, so the
# searches run over row batches that stay in cache, one batch per core (map_chunks): measured on 2 cores shared with
# other jobs, 2.5-4x faster than both threads on each op of 64 MiB batches, with the same choices.
CANDIDATE_ELEMENTS = 1 << 20


def clip_ratios(n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """AutoAWQ's grid: 1 - i / n_grid for i < max_shrink * n_grid -> [1.00, 0.95, ..., 0.55]."""
    return 1 - torch.arange(int(max_shrink * n_grid), dtype=torch.float32) / n_grid


def candidate_bounds(wg: torch.Tensor, ratios: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped weights [N, ng, G] -> (lo, hi) [C, N, ng] for each candidate; candidate 0 is always unclipped."""
    mn, mx = wg.amin(-1), wg.amax(-1)
    r = ratios[:, None, None]
    if mode == "range2d":
        r_lo, r_hi = (t.reshape(-1, 1, 1) for t in torch.meshgrid(ratios, ratios, indexing="ij"))
        return torch.where(mn < 0, mn * r_lo, mn), torch.where(mx > 0, mx * r_hi, mx)
    if mode == "range":
        lo = torch.where(mn < 0, mn * r, mn)
        hi = torch.where(mx > 0, mx * r, mx)
    elif mode == "sym":
        m = torch.maximum(mn.abs(), mx.abs()) * r
        lo, hi = torch.maximum(mn, -m), torch.minimum(mx, m)
    else:
        raise ValueError(f"clip mode {mode!r}; choose one of {CLIP_MODES}")
    return lo, hi


def diagonal_blocks(H: torch.Tensor, G: int) -> torch.Tensor:
    """[K, K] -> [K // G, G, G]: the Gram matrix's blocks for each group of input channels."""
    ng = H.shape[0] // G
    return H.view(ng, G, ng, G).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def group_errors(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, Hb: torch.Tensor, qmax: int) -> torch.Tensor:
    """wg [N, ng, G], lo/hi [R, N, ng], Hb [ng, G, G] -> [R, N, ng] per-group output error d^T H_gg d."""
    d = fake_quantize_grouped(wg[None], lo, hi, qmax).sub_(wg)  # [R, N, ng, G]
    R, N, ng, G = d.shape
    dg = d.permute(2, 0, 1, 3).reshape(ng, R * N, G)
    err = (torch.bmm(dg, Hb) * dg).sum(-1)  # [ng, R * N]
    return err.view(ng, R, N).permute(1, 2, 0)


@dataclass
class ClipChoice:
    lo: torch.Tensor  # [N, ng] chosen bounds
    hi: torch.Tensor
    ratio: torch.Tensor  # [N, ng] chosen ratio per group (1.0: unclipped)


def search_clip(
    W: torch.Tensor,
    H_fit: torch.Tensor,
    H_val: torch.Tensor,
    spec: QuantSpec,
    ratios: torch.Tensor,
    mode: str = "range",
    holdout_gate: bool = True,
) -> ClipChoice:
    """W [N, K] fp32 (already scaled), H_* [K, K] for the same (scaled) input. Per group, the ratio with the least
    error on the fit tokens; with holdout_gate, a group whose held-out error is not lower than unclipped stays
    unclipped. ratios[0] must be 1.0."""
    N, K = W.shape
    G = spec.group(K)
    wg = grouped(W, G)
    Hb_fit, Hb_val = diagonal_blocks(H_fit, G), diagonal_blocks(H_val, G)
    lo_all, hi_all = candidate_bounds(wg, ratios, mode)  # [R, N, ng]
    R = lo_all.shape[0]
    best = torch.empty(N, K // G, dtype=torch.long)
    rows = max(1, CANDIDATE_ELEMENTS // (R * K))

    def search(i: int) -> None:
        sl = slice(i, i + rows)
        err = group_errors(wg[sl], lo_all[:, sl], hi_all[:, sl], Hb_fit, spec.qmax)
        choice = err.argmin(0)  # [n, ng]
        if holdout_gate:
            lo_c, hi_c = _at(lo_all[:, sl], choice), _at(hi_all[:, sl], choice)
            val = group_errors(wg[sl], torch.stack([lo_c, lo_all[0, sl]]), torch.stack([hi_c, hi_all[0, sl]]), Hb_val, spec.qmax)
            choice = torch.where(val[0] < val[1], choice, torch.zeros_like(choice))
        best[sl] = choice

    map_chunks(search, range(0, N, rows))
    if mode == "range2d":  # report the ratio of the range kept
        ratio = (_at(hi_all, best) - _at(lo_all, best)) / (hi_all[0] - lo_all[0]).clamp(min=1e-12)
    else:
        ratio = ratios[best]
    return ClipChoice(_at(lo_all, best), _at(hi_all, best), ratio)


def _at(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[R, N, ng] candidates, idx [N, ng] -> [N, ng] the chosen candidate of each group."""
    return t.gather(0, idx[None])[0]


def refit_bounds(
    W: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    H_fit: torch.Tensor,
    H_val: torch.Tensor,
    spec: QuantSpec,
    holdout_gate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One least-squares refinement of each group's step after the clip search.

    With the codes c = q - z that (lo, hi) give a group, the step minimising its output error d^T H_gg d, d = s c - w,
    is s* = (c^T H_gg w) / (c^T H_gg c) in closed form; the zero point z is kept. The new bounds -z s*, (qmax - z) s*
    re-round the codes with s*, and a group takes them only where that lowers its fit error (and, with the gate, its
    held-out error). W [N, K] (scaled), lo/hi [N, K // G]. Returns (lo, hi, share of groups changed)."""
    N, K = W.shape
    G = spec.group(K)
    wg = grouped(W, G)  # [N, ng, G]
    Hb_fit, Hb_val = diagonal_blocks(H_fit, G), diagonal_blocks(H_val, G)
    lo_out, hi_out = torch.empty_like(lo), torch.empty_like(hi)
    keep = torch.empty(lo.shape, dtype=torch.bool)
    rows = max(1, CANDIDATE_ELEMENTS // (2 * K))  # group_errors scores 2 candidates per row

    def refit(i: int) -> None:
        sl = slice(i, i + rows)
        lo_out[sl], hi_out[sl], keep[sl] = _refit_rows(wg[sl], lo[sl], hi[sl], Hb_fit, Hb_val, spec.qmax, holdout_gate)

    map_chunks(refit, range(0, N, rows))
    return lo_out, hi_out, float(keep.float().mean())


def _refit_rows(wg, lo, hi, Hb_fit, Hb_val, qmax: int, holdout_gate: bool):
    """refit_bounds on rows wg [n, ng, G] with bounds [n, ng] -> (lo, hi, keep [n, ng])."""
    scale, zero = params_from_bounds(lo, hi, qmax)
    c = (codes_for(wg, scale, zero, qmax) - zero.unsqueeze(-1)).transpose(0, 1)  # [ng, n, G]
    Hc = torch.bmm(c, Hb_fit)
    num, den = (Hc * wg.transpose(0, 1)).sum(-1).t(), (Hc * c).sum(-1).t()  # [n, ng]
    step = num / den.clamp(min=1e-30)
    step = torch.where((den > 0) & (step > 0), step, scale)
    lo_new, hi_new = -zero * step, (qmax - zero) * step
    both_lo, both_hi = torch.stack([lo, lo_new]), torch.stack([hi, hi_new])
    fit = group_errors(wg, both_lo, both_hi, Hb_fit, qmax)
    keep = fit[1] < fit[0]
    if holdout_gate:
        val = group_errors(wg, both_lo, both_hi, Hb_val, qmax)
        keep &= val[1] < val[0]
    return torch.where(keep, lo_new, lo), torch.where(keep, hi_new, hi), keep
