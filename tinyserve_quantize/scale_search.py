"""AWQ's activation-aware scale search, scored exactly on the calibration tokens through their Gram matrix.

For a scaling group (linears W_i [N_i, K] reading one input x [K]) and a per-channel scale s [K], the quantized
group computes (x / s) @ Q(W * s)^T, so its weight error in the original input space is dW = Q(W * s) / s - W and its
mean squared output error over the calibration tokens is tr(dW H dW^T) with H = X^T X / T (calibration.py).
Candidates s = x_mean^alpha (or the "duo" variant x_mean^alpha / w_mean^(1 - alpha)), normalised by
sqrt(max * min), are scored in batches of A candidates by candidate_errors: the [A * N, K] @ [K, K] product, from the
blocks of H on and above its diagonal.
"""

from dataclasses import dataclass

import torch
from torch import nn

from tinyserve_quantize.calibration import SiteStats
from tinyserve_quantize.quantizer import QuantSpec, fake_quantize_grouped, grouped, map_chunks

CANDIDATE_ELEMENTS = 1 << 24  # elements of one batch of candidate weights [A, N, K] (64 MiB in fp32)
CHUNK_ELEMENTS = 1 << 18  # elements of one row chunk of the elementwise work (1 MiB in fp32: it stays in L2)
H_BLOCKS = 4  # column blocks of H in candidate_errors: measured fastest of 2, 4, 8 at K = 896 and 4864


def upper_blocks(H: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """H [K, K] symmetric -> (H' in dtype, its H_BLOCKS column blocks J = (j0, j1)), H' being H with its blocks above
    the diagonal doubled: then sum_n dW_n H dW_n^T = sum_J <dW[:, :j1] @ H'[:j1, J], dW_J>, and the blocks below the
    diagonal are never multiplied (0.65x the GEMM time)."""
    K = H.shape[0]
    width = -(-K // H_BLOCKS)
    blocks = [(j, min(j + width, K)) for j in range(0, K, width)]
    Hd = H.to(dtype, copy=True)
    for j0, j1 in blocks:
        Hd[:j0, j0:j1] *= 2  # exact in any float dtype
    return Hd, blocks


def weighted_error(dW: torch.Tensor, H: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dW [..., N, K], H [K, K] -> [...]: sum over rows of dW_n H dW_n^T (the summed per-token squared output error).
    The product runs in dtype (fp32 accumulation), the final dot products in fp32."""
    K = H.shape[0]
    Hd, blocks = upper_blocks(H, dtype)
    X = dW.reshape(-1, K).to(dtype)
    P = torch.empty(X.shape, dtype=dtype)
    for j0, j1 in blocks:
        torch.mm(X[:, :j1], Hd[:j1, j0:j1], out=P[:, j0:j1])
    return (P.float().view(dW.shape) * dW).sum((-2, -1))


@torch.no_grad()
def candidate_errors(
    W: torch.Tensor, S: torch.Tensor, H: torch.Tensor, spec: QuantSpec, dtype: torch.dtype
) -> torch.Tensor:
    """W [N, K] fp32, S [A, K] candidate scales, H [K, K] -> [A]: weighted_error(Q(W * s) / s - W, H) of each s.

    H is symmetric, so only its blocks on and above the diagonal are multiplied (upper_blocks). The GEMMs run in dtype
    (fp32 accumulation) on batches of A' candidates, [A' * N, end_J] @ [end_J, |J|], on all threads. The elementwise
    work around them (building dW, the final dot products) runs on row chunks that stay in L2, one chunk per core at a
    time (map_chunks), into buffers reused from batch to batch: done on whole [A', N, K] tensors, each of its ~12
    passes went to DRAM into freshly allocated memory, and the passes together cost more than the GEMM for the K = 896
    groups."""
    N, K = W.shape
    A = len(S)
    G = spec.group(K)
    step = min(A, max(1, CANDIDATE_ELEMENTS // (N * K)))
    rows = max(1, CHUNK_ELEMENTS // K)
    Hd, blocks = upper_blocks(H, dtype)
    dW = torch.empty(step, N, K)  # fp32 errors of the batch's candidates
    dWd = dW if dtype == torch.float32 else torch.empty(step, N, K, dtype=dtype)
    P = torch.empty(step * N, K, dtype=dtype)
    err = torch.empty(A)
    for i in range(0, A, step):
        n = min(step, A - i)
        chunks = [(a, r) for a in range(n) for r in range(0, N, rows)]

        def build(chunk):
            a, r = chunk
            w, d = W[r : r + rows], dW[a, r : r + rows]  # [rows, K]
            torch.mul(w, S[i + a], out=d)
            dg = grouped(d, G)
            fake_quantize_grouped(dg, dg.amin(-1), dg.amax(-1), spec.qmax, out=dg)
            d.div_(S[i + a]).sub_(w)
            if dWd is not dW:
                dWd[a, r : r + rows].copy_(d)

        def dot(chunk) -> float:
            a, r = chunk
            p = P[a * N + r : a * N + min(r + rows, N)].float()
            return float(torch.dot(p.view(-1), dW[a, r : r + rows].reshape(-1)))

        map_chunks(build, chunks)
        X = dWd[:n].view(n * N, K)
        for j0, j1 in blocks:
            torch.mm(X[:, :j1], Hd[:j1, j0:j1], out=P[: n * N, j0:j1])
        dots = map_chunks(dot, chunks)
        for a in range(n):
            err[i + a] = sum(d for (b, _), d in zip(chunks, dots) if b == a)  # fp64 sum of the chunks' fp32 dots, in row order
    return err


def w_mean_of(W: torch.Tensor, G: int) -> torch.Tensor:
    """AutoAWQ's per-input-channel weight magnitude: |w| normalised by its group's max, averaged over rows. [K]."""
    wg = grouped(W.abs(), G)
    return (wg / (wg.amax(-1, keepdim=True) + 1e-6)).flatten(-2).mean(0)


def scale_candidates(x_mean: torch.Tensor, w_mean: torch.Tensor | None, n_grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (alphas [A], scales [A, K]), alpha in {0, 1/n, ..., (n-1)/n}; w_mean given: the "duo" variant."""
    alphas = torch.arange(n_grid, dtype=torch.float32) / n_grid
    a = alphas[:, None]
    if w_mean is None:
        s = x_mean[None].pow(a).clamp(min=1e-4)
    else:
        s = (x_mean[None].pow(a) / (w_mean[None].pow(1 - a) + 1e-4)).clamp(min=1e-4)
    s = s / (s.amax(-1, keepdim=True) * s.amin(-1, keepdim=True)).sqrt()
    return alphas, s


@dataclass
class ScaleChoice:
    alpha: float | None  # None: the group is left unscaled
    scales: torch.Tensor  # [K] the s applied (ones when unscaled)
    val_error: float  # held-out output error (summed over the group's outputs) of the choice
    val_error_unscaled: float
    fit_errors: list[float]  # per grid point


def search_scales(
    weights: list[torch.Tensor],
    stats: SiteStats,
    spec: QuantSpec,
    n_grid: int = 20,
    duo: bool = False,
    holdout_gate: bool = True,
    dtype: torch.dtype = torch.float32,
    tie: torch.Tensor | None = None,
) -> ScaleChoice:
    """weights: the group's W_i [N_i, K] in fp32. Picks alpha on the fit tokens; keeps it only if it also beats the
    unscaled group on the held-out tokens (when holdout_gate).

    tie [K] (optional): input channel k may only be scaled by the scale of prev's output channel tie[k]. Under
    grouped-query attention o_proj's input channel (head h, dim d) carries v_proj's output (kv head h // rep, dim d),
    so one v_proj scale serves rep o_proj channels; candidates are built on prev's channels and expanded."""
    W = torch.cat(weights)  # [N, K]
    N, K = W.shape
    G = spec.group(K)
    x_mean = stats.x_mean.clamp(min=1e-4)
    w_mean = w_mean_of(W, G) if duo else None
    if tie is not None:  # average the tied channels' statistics onto prev's channels
        n_prev = int(tie.max()) + 1
        count = torch.zeros(n_prev).index_add_(0, tie, torch.ones(K))
        x_mean = torch.zeros(n_prev).index_add_(0, tie, x_mean) / count
        w_mean = None if w_mean is None else torch.zeros(n_prev).index_add_(0, tie, w_mean) / count
    alphas, S = scale_candidates(x_mean, w_mean, n_grid)
    if tie is not None:
        S = S[:, tie]  # [A, K]

    fit = candidate_errors(W, S, stats.H_fit, spec, dtype)
    best = int(fit.argmin())
    ones = torch.ones(K)
    val_best, val_plain = candidate_errors(W, torch.stack([S[best], ones]), stats.H_val, spec, dtype).tolist()
    if holdout_gate and val_plain <= val_best:
        return ScaleChoice(None, ones, val_plain, val_plain, fit.tolist())
    return ScaleChoice(float(alphas[best]), S[best].clone(), val_best, val_plain, fit.tolist())


def gqa_tie(n_heads: int, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """[n_heads * head_dim] o_proj input channel -> the v_proj output channel it carries (repeat_kv's order)."""
    h = torch.arange(n_heads * head_dim) // head_dim
    d = torch.arange(n_heads * head_dim) % head_dim
    return (h // (n_heads // n_kv_heads)) * head_dim + d


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Module], s: torch.Tensor, tie: torch.Tensor | None = None) -> None:
    """Multiply the linears' input channels by s [K] and divide prev's output channels by s, in place. The block's
    function is unchanged: prev now emits x / s and the linears compute (x / s) @ (W * s)^T = x @ W^T.
    With tie (see search_scales), prev's output channel j is divided by the s of the channels tied to it."""
    s = s.to(linears[0].weight.dtype)
    if isinstance(prev, nn.Linear):
        sp = s if tie is None else torch.zeros(prev.out_features, dtype=s.dtype).index_copy_(0, tie, s)
        prev.weight.div_(sp[:, None])  # [K_out, K_in]
        if prev.bias is not None:
            prev.bias.div_(sp)
    else:  # a norm with an elementwise weight [K] (RMSNorm / LayerNorm)
        prev.weight.div_(s)
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s)
    for lin in linears:
        lin.weight.mul_(s[None, :])
