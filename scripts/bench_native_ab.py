"""A/B two or more builds of our CPU INT4 kernel (tinyserve_kernels/cpu_native.py) on cold weights, interleaved in one process.

    python scripts/bench_native_ab.py --variant base= --variant other=-DSOME_CONSTANT=2 --m 1
    python scripts/bench_native_ab.py --variant native --variant avx512bf16 --m 1 2 --threads 2

A variant is a name from cpu_native.VARIANTS, or NAME=FLAGS: the native build plus extra compiler flags (comma-separated),
for a constant the source lets a -D flag override while an experiment runs. Each shape cycles through enough copies of
its packed weights to exceed --working-set-mib (cold, as in a decode step); every round times each variant in turn,
and each reports its best round, so the ratio to the first variant is what to read (the dev VM is noisy).
"""

import argparse
import time

import torch

from tinyserve_kernels import cpu_native
from tinyserve_kernels.layout import pack

SHAPES = [(576, 576, 64), (1536, 576, 64), (4096, 4096, 128), (11008, 4096, 128)]  # (K, N, G)


def add_variant(spec: str) -> str:
    if "=" not in spec:
        if spec not in cpu_native.VARIANTS:
            raise SystemExit(f"unknown variant {spec!r}: use one of {sorted(cpu_native.VARIANTS)} or NAME=FLAGS")
        return spec
    name, flags = spec.split("=", 1)
    cpu_native.VARIANTS[name] = ["-march=native", *[f for f in flags.split(",") if f]]
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", required=True, help="NAME or NAME=FLAGS (at least two)")
    ap.add_argument("--m", nargs="+", type=int, default=[1])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--working-set-mib", type=int, default=512)
    a = ap.parse_args()
    names = [add_variant(v) for v in a.variant]
    if len(names) < 2:
        raise SystemExit("give at least two --variant")
    torch.set_num_threads(a.threads)
    for name in names:
        print(f"{name}: engine {cpu_native.engine(name)}, flags {' '.join(cpu_native.VARIANTS[name])}")
    g = torch.Generator().manual_seed(0)
    for K, N, G in SHAPES:
        q = torch.randint(0, 16, (K, N), dtype=torch.int32, generator=g)
        z = torch.randint(0, 16, (K // G, N), dtype=torch.int32, generator=g)
        s = (torch.rand(K // G, N, generator=g) * 0.01).half()
        w0 = cpu_native.repack(pack(q), pack(z), s, G)
        copies = max(1, (a.working_set_mib << 20) // w0.packed.numel())
        ws = [w0] + [cpu_native.NativePacked(w0.packed.clone(), G, K, N) for _ in range(copies - 1)]
        for M in a.m:
            x = torch.randn(M, K, generator=g)
            best = {n: float("inf") for n in names}
            for _ in range(a.rounds):
                for n in names:
                    cpu_native.linear(x, ws[0], variant=n)
                    t = time.perf_counter()
                    for w in ws:
                        cpu_native.linear(x, w, variant=n)
                    best[n] = min(best[n], (time.perf_counter() - t) / len(ws))
            cells = "  ".join(f"{n} {best[n] * 1e3:.4f} ms ({best[n] / best[names[0]]:.3f})" for n in names)
            print(f"{K}x{N} G{G} M={M}: {cells}")


if __name__ == "__main__":
    main()
