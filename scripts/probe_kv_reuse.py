"""Can a KV cache entry be reused bit for bit? (issue 19's design question) On the default INT4 model, through the
runner as `serve` builds it (batch-invariant decode): is a position's key/value the same whether it was prefilled in
a chunk of T tokens, a chunk of T' tokens, or decoded one token at a time; and what does copying a slot's prefix to
another slot cost against prefilling it?

    python scripts/probe_kv_reuse.py [--threads 1,2]                 # serve's runner before position invariance
    python scripts/probe_kv_reuse.py --position-invariant off,on     # both runners, prefill times side by side
    python scripts/probe_kv_reuse.py --ops      # which ops make a row's result depend on the rows beside it
"""

import argparse
import time

import torch

from tinyserve.generation.tokenizer import Tokenizer
from tinyserve.runtime.runner import ModelRunner, RunnerConfig
from tinyserve_quantize.default_model import ensure_quantized_default
from tinyserve_quantize.text_data import eval_text


def ops() -> None:
    """Row i of an op's output computed within M (or T) rows vs within fewer: an int4 linear (the eager backend's
    dispatch, SmolLM2's MLP shape), a dense bf16 matmul, causal attention over a chunk and one query."""
    from tinyserve_kernels import dispatch
    from tinyserve_kernels.layout import pack_linear
    from tinyserve_quantize.quantizer import QuantSpec, quantize_weight

    def same(a, b):
        return "identical" if torch.equal(a, b) else f"differ (max |diff| {float((a.float() - b.float()).abs().max()):.3g})"

    torch.manual_seed(0)
    K, N = 576, 1536
    W = torch.randn(N, K)
    w = dispatch.prepare(*pack_linear(*quantize_weight(W, QuantSpec(4, 64))), 64, cpu_dense_cache=True)
    x = torch.randn(98, K, dtype=torch.bfloat16)
    full, dense = dispatch.int4_linear(x, w), x @ W.to(torch.bfloat16).t()
    for M in (1, 8, 16, 88):
        print(f"int4 linear, rows 0-{M - 1} alone vs within 98 rows: {same(dispatch.int4_linear(x[:M], w), full[:M])}")
        print(f"bf16 matmul, rows 0-{M - 1} alone vs within 98 rows: {same(x[:M] @ W.to(torch.bfloat16).t(), dense[:M])}")
    q, k, v = (torch.randn(1, 9, 98, 64, dtype=torch.bfloat16) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    chunk = sdpa(q, k, v, is_causal=True)
    print(f"causal attention, queries 0-87 in a chunk of 88 vs of 98: {same(sdpa(q[:, :, :88], k[:, :, :88], v[:, :, :88], is_causal=True), chunk[:, :, :88])}")
    print(f"attention, query 87 alone (decode) vs in the chunk of 98: {same(sdpa(q[:, :, 87:88], k[:, :, :88], v[:, :, :88]), chunk[:, :, 87:88])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--ops", action="store_true", help="test single ops instead of the model")
    ap.add_argument("--position-invariant", default="off", help="off, on or off,on: RunnerConfig.position_invariant")
    a = ap.parse_args()
    if a.ops:
        return ops()
    folder = ensure_quantized_default()
    modes = [m.strip() == "on" for m in a.position_invariant.split(",")]
    for threads, invariant in ((t, m) for t in map(int, a.threads.split(",")) for m in modes):
        r = ModelRunner(folder, RunnerConfig(device="cpu", num_slots=3, max_seq_len=2048, batch_invariant=True, threads=threads,
                                             position_invariant=invariant))
        ids = Tokenizer(folder).encode(eval_text())[:1100]
        k, v = r.cache.k, r.cache.v  # [layers, slots, Hkv, S, D]
        a, b, c = r.alloc_slot(), r.alloc_slot(), r.alloc_slot()
        r.prefill(a, ids[:512], 0)  # a: chunks 512 + 88, then positions 600..609 decoded one at a time
        r.prefill(a, ids[512:600], 512)
        for p in range(600, 610):
            r.decode([a], [ids[p]])
        r.prefill(b, ids[:512], 0)  # b: chunks 512 + 98
        r.prefill(b, ids[512:610], 512)
        for s in range(0, 610, 256):  # c: chunks of 256
            r.prefill(c, ids[s:min(610, s + 256)], s)

        def diff(x: int, y: int, lo: int, hi: int) -> str:
            d = max(float((t[:, x, :, lo:hi].float() - t[:, y, :, lo:hi].float()).abs().max()) for t in (k, v))
            return "identical" if d == 0 else f"differ (max |diff| {d})"

        print(f"{type(r.backend).__name__}, position_invariant {r.position_invariant}, {threads} thread(s):")
        print(f"  positions 0-511, the same chunk of 512:          {diff(a, b, 0, 512)}")
        print(f"  positions 512-599, a chunk of 88 vs one of 98:    {diff(a, b, 512, 600)}")
        print(f"  positions 600-609, decoded vs prefilled:          {diff(a, b, 600, 610)}")
        print(f"  positions 0-511, chunks of 512 vs chunks of 256: {diff(b, c, 0, 512)}")
        for n in (128, 512, 1024):
            prefill = float("inf")
            for _ in range(3):  # best of 3
                t0 = time.perf_counter()
                for s in range(0, n, 512):
                    r.prefill(c, ids[s:min(n, s + 512)], s)
                prefill = min(prefill, time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(10):
                k[:, b, :, :n].copy_(k[:, c, :, :n])
                v[:, b, :, :n].copy_(v[:, c, :, :n])
            copy = (time.perf_counter() - t0) / 10
            print(f"  {n} tokens: prefill {prefill * 1e3:.1f} ms; copying them to another slot {copy * 1e3:.2f} ms "
                  f"({r.cache.bytes_per_token() * n / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
