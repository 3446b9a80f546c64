"""What one call of our CPU INT4 kernel costs besides the kernel: its direct Python binding (what cpu_native.linear
calls) against its torch.ops registration, on a tiny layer (the call is nearly all overhead) and on the SmolLM2
shapes with cold weights, with torch.add on the same tiny x as a reference for a plain torch op.

    python scripts/bench_call_overhead.py
    python scripts/bench_call_overhead.py --threads 1

Times are the best of interleaved rounds in microseconds (scripts/bench_kernels.py, cpu_time); compare within a run.
"""

import argparse

import torch
import torch.nn.functional as F

from bench_kernels import copies_for, cpu_time, cycling, int4_bytes, random_packed
from tinyserve_kernels import cpu_native

SHAPES = [(64, 16, 64), (576, 576, 64), (576, 1536, 64), (1536, 576, 64)]  # (K, N, G); the first is all overhead


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--working-set-mib", type=int, default=512)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not cpu_native.available():
        raise SystemExit("the native CPU kernel is not available here (see the log line above)")
    binding, registered = cpu_native.load("native"), getattr(torch.ops, cpu_native.namespace("native"))
    print(f"{torch.get_num_threads()} threads, engine {cpu_native.engine()}; us per call, M = 1")
    print(f"{'K x N':>11} | {'linear()':>9} {'binding':>9} {'torch.ops':>9} {'saved':>7} | {'fp32':>8} {'x fp32':>7}")
    for K, N, G in SHAPES:
        # Each path cycles through its own copies: one path's last calls must not leave weights in cache for the next.
        # The tiny layer stays hot (it measures the call, and 512 MiB of 640-byte copies would take minutes to make).
        n = 1 if K == 64 else copies_for(int4_bytes(K, N, G), a.working_set_mib << 20)
        ws = [[cpu_native.repack(*random_packed(K, N, G, "cpu"), G) for _ in range(n)] for _ in range(3)]
        x = torch.randn(1, K)
        fns = {
            "linear": cycling(lambda w: cpu_native.linear(x, w), ws[0]),
            "binding": cycling(lambda w: binding.int4_mm(x, w.packed, None, N, G), ws[1]),
            "torch.ops": cycling(lambda w: registered.int4_mm(x, w.packed, None, N, G), ws[2]),
        }
        if K == 64:
            fns["add"] = lambda: torch.add(x, x)
        else:
            dense = [torch.randn(N, K) for _ in range(copies_for(4 * K * N, a.working_set_mib << 20))]
            fns["fp32"] = cycling(lambda w: F.linear(x, w), dense)
        t = {k: v * 1e6 for k, v in cpu_time(fns, a.rounds).items()}
        ref = f"{'add':>4} {t['add']:4.2f} {'':>7}" if K == 64 else f"{t['fp32']:8.2f} {t['fp32'] / t['linear']:7.2f}"
        print(f"{K:>4} x {N:<4} | {t['linear']:9.2f} {t['binding']:9.2f} {t['torch.ops']:9.2f} {t['torch.ops'] - t['binding']:7.2f} | {ref}",
              flush=True)


if __name__ == "__main__":
    main()
