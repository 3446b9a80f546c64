"""Asymmetric integer quantization of weight groups (the formula every other part of the quantizer uses).

A linear weight W [N, K] (PyTorch's [out, in] orientation) is cut into groups of G consecutive input channels per
output row: [N, K // G, G]. Each group gets

    scale = (hi - lo) / (2^b - 1)            rounded to fp16, as it is stored in the file
    zero  = clamp(-round(lo / scale), 0, 2^b - 1)
    q     = clamp(round(w / scale) + zero, 0, 2^b - 1)
    w'    = (q - zero) * scale

where lo, hi are the group's min and max (RTN), or clipped bounds chosen by the clip search. Rounding the scale to
fp16 *before* the codes are computed makes fake quantization here bit-identical to dequantizing the exported file.
"""

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import torch

from tinyserve_kernels.layout import SUPPORTED_BITS

SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)
MIN_SCALE = 1e-5  # as AutoAWQ: a constant group still gets a usable (tiny) step


class QuantizationError(ValueError):
    """A user-facing problem with the model or settings; the message names the layer."""


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 64  # -1: one group per output channel over all of K

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise QuantizationError(f"w-bit {self.bits} is not supported; choose one of {list(SUPPORTED_BITS)}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise QuantizationError(f"group size {self.group_size} is not supported; choose one of {list(SUPPORTED_GROUP_SIZES)}")

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def group(self, in_features: int, name: str = "") -> int:
        """The group size G for a linear with K = in_features; a G that does not divide K is an error naming the layer."""
        G = in_features if self.group_size == -1 else self.group_size
        if in_features % G:
            where = f"{name}: " if name else ""
            raise QuantizationError(
                f"{where}group size {G} does not divide in_features {in_features}; use a group size that divides it (or -1)"
            )
        return G


@contextmanager
def one_thread() -> Iterator[None]:
    """For loops of small elementwise ops on cache-sized chunks: with two OpenMP threads each op ends in a barrier
    that waits for the other thread, which on a shared 2-core CPU is often descheduled (measured under load: a
    [292, 896] multiply took 26 us on one thread, 8 ms on two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


MAX_CHUNK_WORKERS = 4  # Python threads take turns on the GIL between ops; more than a few wait more than they work


@cache
def _workers(n: int) -> ThreadPoolExecutor:
    # each worker's torch ops run on the worker itself (OpenMP's per-thread setting, made once per thread)
    return ThreadPoolExecutor(n, thread_name_prefix="quantize-chunks", initializer=torch.set_num_threads, initargs=(1,))


def map_chunks(fn: Callable, chunks: Iterable) -> list:
    """[fn(c) for c in chunks], the chunks spread over one Python thread per core, each of whose torch ops runs on
    its calling thread (one_thread): loops of small ops on cache-sized chunks then use every core without OpenMP's
    per-op barriers. fn must only write what its chunk owns; it makes no tensor without a device (the caller's device
    context does not reach the workers). Results come back in the chunks' order."""
    n = min(torch.get_num_threads(), MAX_CHUNK_WORKERS)
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(c):  # grad and inference mode are per thread: the worker takes the caller's
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(c)

    with one_thread():
        if n < 2:
            return [fn(c) for c in chunks]
        return list(_workers(n).map(run, chunks))


def grouped(w: torch.Tensor, G: int) -> torch.Tensor:
    """[..., N, K] -> [..., N, K // G, G] (a view)."""
    return w.unflatten(-1, (w.shape[-1] // G, G))


def params_from_bounds(lo: torch.Tensor, hi: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group bounds (any shape) -> (scale, zero) of the same shape; scale is fp16-representable, zero an integer."""
    scale = ((hi - lo).clamp(min=MIN_SCALE) / qmax).half().float()
    zero = (-torch.round(lo / scale)).clamp(0, qmax)
    return scale, zero


def codes_for(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    """Grouped weights [..., G] with per-group scale/zero [...] -> integer codes (as float) [..., G]."""
    return (torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, qmax)


def fake_quantize_grouped(
    wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qmax: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize-dequantize grouped weights [..., G] with bounds lo, hi [...], into out (may be wg itself) if given."""
    scale, zero = params_from_bounds(lo, hi, qmax)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    # The ops of codes_for, then (q - z) * s, in place on one buffer (out, or a new one), as the searches run this on
    # many candidates at a time.
    return torch.div(wg, s, out=out).round_().add_(z).clamp_(0, qmax).sub_(z).mul_(s)


def fake_quantize(w: torch.Tensor, spec: QuantSpec, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> torch.Tensor:
    """w [..., N, K] -> quantize-dequantized w in fp32. lo, hi [..., N, K // G] default to each group's min and max."""
    G = spec.group(w.shape[-1])
    wg = grouped(w.float(), G)
    lo = wg.amin(-1) if lo is None else lo
    hi = wg.amax(-1) if hi is None else hi
    return fake_quantize_grouped(wg, lo, hi, spec.qmax).flatten(-2)


def quantize_weight(
    w: torch.Tensor, spec: QuantSpec, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None, name: str = ""
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes [N, K] int32, zeros [N, K // G] int32, scales [N, K // G] fp16), ready for pack_linear."""
    G = spec.group(w.shape[-1], name)
    wg = grouped(w.float(), G)
    lo = wg.amin(-1) if lo is None else lo
    hi = wg.amax(-1) if hi is None else hi
    scale, zero = params_from_bounds(lo, hi, spec.qmax)
    codes = codes_for(wg, scale, zero, spec.qmax).flatten(-2)
    return codes.to(torch.int32), zero.to(torch.int32), scale.half()
