"""Can a KV cache entry be reused bit for bit? (issue 19's design question) On the default INT4 model, through the
runner as `serve` builds it (batch-invariant decode): is a position's key/value the same whether it was prefilled in
a chunk of T tokens, a chunk of T' tokens, or decoded one token at a time; and what does copying a slot's prefix to
another slot cost against prefilling it?

    python scripts/probe_kv_reuse.py [--threads 1,2]
"""

import argparse
import time

import torch

from tinyserve.generation.tokenizer import Tokenizer
from tinyserve.runtime.runner import ModelRunner, RunnerConfig
from tinyserve_quantize.default_model import ensure_quantized_default
from tinyserve_quantize.text_data import eval_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    folder = ensure_quantized_default()
    for threads in map(int, ap.parse_args().threads.split(",")):
        r = ModelRunner(folder, RunnerConfig(device="cpu", num_slots=3, max_seq_len=2048, batch_invariant=True, threads=threads))
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

        print(f"{type(r.backend).__name__}, {threads} thread(s):")
        print(f"  positions 0-511, the same chunk of 512:          {diff(a, b, 0, 512)}")
        print(f"  positions 512-599, a chunk of 88 vs one of 98:    {diff(a, b, 512, 600)}")
        print(f"  positions 600-609, decoded vs prefilled:          {diff(a, b, 600, 610)}")
        print(f"  positions 0-511, chunks of 512 vs chunks of 256: {diff(b, c, 0, 512)}")
        for n in (512, 1024):
            t0 = time.perf_counter()
            for s in range(0, n, 512):
                r.prefill(c, ids[s:s + 512], s)
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(10):
                k[:, b, :, :n].copy_(k[:, c, :, :n])
                v[:, b, :, :n].copy_(v[:, c, :, :n])
            copy = (time.perf_counter() - t0) / 10
            print(f"  {n} tokens: prefill {prefill * 1e3:.1f} ms; copying them to another slot {copy * 1e3:.2f} ms "
                  f"({r.cache.bytes_per_token() * n / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
