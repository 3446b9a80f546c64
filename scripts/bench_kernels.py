"""Benchmark the INT4 linear kernels against dense matmuls of the same shape, measured in the same run.

    python scripts/bench_kernels.py                  # every shape and M of issue 3, on CUDA if present, else CPU
    python scripts/bench_kernels.py --quick          # SmolLM2 + one 7B shape, M up to 256
    python scripts/bench_kernels.py --shapes smollm2 --m 1 2 4 8 16
    python scripts/bench_kernels.py --threads 1 --shapes smollm2 smollm2-fused --m 1 2 4 8 16 32 64 --native-variant avx512bf16

Per shape and M it prints the time of every path the dispatcher can choose (CPU: torch's int4 op, our own kernel
(tinyserve_kernels/cpu_native.py; --native-variant picks a build) and the op's time over it, dequantize per call + bf16
matmul, a cached dense bf16 weight; CUDA: Triton GEMV, Triton GEMM, Triton dequant + cuBLAS), the path the runtime
picks (CPU: where TINYSERVE_CPU_KERNEL lets the cpu-native backend run, "native" up to its NATIVE_MAX_ROWS rows and
"cached", its dense bf16 copy, beyond; else the eager backend's, tinyserve_kernels.dispatch.choose_path; CUDA:
choose_path), its effective bandwidth (packed weight + scales + zeros + activations, divided by its time) and that
bandwidth's share of the machine's copy bandwidth measured at the start of the same run, and its speedup over dense
bf16 and fp32 matmuls (CPU) or an fp16 matmul (CUDA) of the same shape.

Weights are cold as in a real decode step, which streams every layer once: each path cycles through enough copies of
its weights to exceed --working-set-mib, so they are not served from cache (CPU); do_bench flushes L2 (CUDA).
CPU timings are the best of several interleaved rounds (every path of one case in turn, each round a batch of calls):
the 2-core dev VM is shared, and when another process takes a core torch's 2-thread kernels stall for a scheduler tick
(~8 ms), so medians measure the neighbours. The load average is printed with the results; compare the ratios of one
run, not absolute numbers across runs.
"""

import argparse
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tinyserve.runtime.backends import cpu_kernel_mode, cpu_kernels_usable
from tinyserve.runtime.backends.cpu_native import NATIVE_MAX_ROWS
from tinyserve_kernels import cpu, cpu_native, dispatch
from tinyserve_kernels.dispatch import choose_path, prepare
from tinyserve_kernels.layout import pack

SHAPES = {  # name: [(K, N, G)], K = in_features, N = out_features
    "llama2-7b": [(4096, 4096, 128), (4096, 11008, 128), (11008, 4096, 128)],
    "llama3-8b": [(4096, 14336, 128), (14336, 4096, 128), (4096, 1024, 128)],
    "smollm2": [(576, 576, 64), (576, 1536, 64), (1536, 576, 64)],
    "smollm2-fused": [(576, 960, 64), (576, 3072, 64)],  # the runtime's fused q|k|v and gate|up linears
}
M_LIST = [1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096]


@dataclass
class Config:
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    m: list[int] = field(default_factory=lambda: list(M_LIST))
    device: str = "auto"
    threads: int = 0  # 0: torch's default
    rounds: int = 15
    working_set_mib: int = 512
    quick: bool = False
    try_inductor_gemv: bool = False
    native_variant: str = "native"  # which build of tinyserve_kernels/cpu_native.py to time (see cpu_native.VARIANTS)


def random_packed(K: int, N: int, G: int, device: str):
    q = torch.randint(0, 16, (K, N), dtype=torch.int32)
    z = torch.randint(0, 16, (K // G, N), dtype=torch.int32)
    s = (torch.rand(K // G, N) * 0.01 + 0.001).half()
    return pack(q).to(device), pack(z).to(device), s.to(device)


def int4_bytes(K: int, N: int, G: int) -> int:
    """What one call must read of the weight in the file layout: nibbles + fp16 scales + packed zero points."""
    return K * N // 2 + (K // G) * N * 2 + (K // G) * N // 2


def copies_for(nbytes: int, working_set: int) -> int:
    return max(1, -(-working_set // max(nbytes, 1)))


def cycling(fn, items):
    """A no-argument callable that applies fn to the next item each call (cold weights)."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(items)
        return fn(items[state["i"]])

    return call


# ---------------------------------------------------------------------------------------------------- CPU

def cpu_time(fns: dict, rounds: int, batch_s: float = 0.002) -> dict:
    """Best-of-rounds seconds per call of each fn; rounds interleave the fns so that load on the machine hits all alike."""
    counts = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        counts[name] = max(1, int(batch_s / max(time.perf_counter() - t0, 1e-7)))
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(counts[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / counts[name])
    return {name: min(v) for name, v in samples.items()}


def cpu_bandwidth(rounds: int, working_set: int) -> tuple[float, float]:
    """(copy, read) GB/s, timed like the kernels: 8 MiB calls cycling through a pool larger than the caches, best of
    interleaved rounds. Copy counts bytes read + written; read is a sum over the buffer."""
    chunk = 2 * 2**20  # floats: 8 MiB
    pool = [torch.rand(chunk) for _ in range(copies_for(4 * chunk, working_set))]
    dst = [torch.empty(chunk) for _ in pool]
    pairs = list(zip(pool, dst))
    t = cpu_time({"copy": cycling(lambda p: p[1].copy_(p[0]), pairs), "read": cycling(lambda a: a.sum(), pool)}, 3 * rounds)
    return 2 * 4 * chunk / t["copy"] / 1e9, 4 * chunk / t["read"] / 1e9


def bench_cpu(cfg: Config) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    copy_bw, read_bw = cpu_bandwidth(cfg.rounds, cfg.working_set_mib * 2**20)
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"measured: copy {copy_bw:.1f} GB/s (read + write), read {read_bw:.1f} GB/s; load average {os.getloadavg()[0]:.2f}")
    print("times in ms (best of interleaved rounds); GB/s and % of copy bandwidth for the dispatched path")
    native, nv = cpu_native.available(), cfg.native_variant
    # Whether the runtime runs our kernel on this CPU (the cpu-native backend, planned from TINYSERVE_CPU_KERNEL): the
    # chosen column is then its choice (our kernel up to NATIVE_MAX_ROWS rows, the cached dense copy beyond), else the
    # eager backend's (tinyserve_kernels.dispatch.choose_path).
    native_default = cpu_kernels_usable(cpu_kernel_mode())
    print(f"native kernel (tinyserve_kernels/cpu_native.py): {f'{nv} build, engine ' + cpu_native.engine(nv) if native else 'not available'}")
    hdr = (f"{'shape KxN':>12} {'G':>4} {'M':>5} | {'int4op':>8} {'native':>8} {'op/nat':>6} {'deq+mm':>8} {'cached':>8} | "
           f"{'chosen':>16} {'GB/s':>6} {'%copy':>6} | {'bf16':>8} {'fp32':>8} {'x bf16':>7} {'x fp32':>7}")
    print(hdr)
    ws = cfg.working_set_mib * 2**20
    best_small, best_large, best_native = {}, {}, {}
    for shape in cfg.shapes:
        for K, N, G in SHAPES[shape]:
            n_int4 = copies_for(int4_bytes(K, N, G), ws)
            prepared, repacked = [], []  # the same random weights in torch's op layout and in our kernel's
            for _ in range(n_int4):
                raw = random_packed(K, N, G, "cpu")
                prepared.append(prepare(*raw, G))
                if native:
                    repacked.append(cpu_native.repack(*raw, G))
            wb = torch.randn(N, K).bfloat16()
            dense_bf16 = [wb] + [wb.clone() for _ in range(copies_for(wb.nbytes, ws) - 1)]
            dense_kn = [cpu.hold_dense(t.t().contiguous()) for t in dense_bf16]  # the cached weight as prepare keeps it
            dense_fp32 = [wb.float() for _ in range(copies_for(4 * K * N, ws))]
            for M in cfg.m:
                if cfg.quick and M > 256:
                    continue
                x = torch.randn(M, K).bfloat16()
                x32 = x.float()
                fns = {
                    "int4op": cycling(lambda w: cpu.int4pack_linear(x, w.int4pack), prepared),
                    "cached": cycling(lambda w: cpu.dense_linear(x, w, N), dense_kn),
                    "bf16": cycling(lambda w: F.linear(x, w), dense_bf16),
                    "fp32": cycling(lambda w: F.linear(x32, w), dense_fp32),
                }
                if cpu.packed_layout_is_known():
                    fns["deq+mm"] = cycling(lambda w: cpu.dequant_matmul(x, w.int4pack), prepared)
                if native:
                    fns["native"] = cycling(lambda w: cpu_native.linear(x, w, variant=nv), repacked)
                rounds = cfg.rounds if M * K * N < 2**33 else 3  # calls of a second or more: 3 rounds
                t = cpu_time(fns, rounds)
                if native_default:
                    chosen = "native" if M <= NATIVE_MAX_ROWS else "cached"
                else:
                    chosen = choose_path("cpu", M, can_dequant=cpu.packed_layout_is_known())
                t_chosen = {"int4pack": t["int4op"], "native": t.get("native"), "cpu_dequant": t.get("deq+mm"),
                            "cached": t["cached"], "cpu_dense_cached": t["cached"]}[chosen]
                gbs = (int4_bytes(K, N, G) + M * K * 2) / t_chosen / 1e9
                nan = float("nan")
                print(
                    f"{K:>5}x{N:<6} {G:>4} {M:>5} | {t['int4op'] * 1e3:8.3f} {t.get('native', nan) * 1e3:8.3f} "
                    f"{t['int4op'] / t.get('native', nan):6.2f} {t.get('deq+mm', nan) * 1e3:8.3f} "
                    f"{t['cached'] * 1e3:8.3f} | {chosen:>16} {gbs:6.1f} {100 * gbs / copy_bw:5.0f}% | "
                    f"{t['bf16'] * 1e3:8.3f} {t['fp32'] * 1e3:8.3f} {t['bf16'] / t_chosen:7.2f} {t['fp32'] / t_chosen:7.2f}",
                    flush=True,
                )
                best_small.setdefault((K, N), []).append((M, t["int4op"] <= t["cached"]))
                if "native" in t:
                    best_native.setdefault((K, N), []).append((M, t["native"] <= t["cached"]))
                if "deq+mm" in t:
                    best_large.setdefault((K, N), []).append((M, t["deq+mm"] < t["int4op"]))
            # Free this shape's weight copies (the timed closures hold them too) before the next shape's are made.
            fns = prepared = repacked = dense_bf16 = dense_kn = dense_fp32 = None
    print("\nthreshold evidence (per shape):")
    for key, rows in best_small.items():
        op_wins = [m for m, win in rows if win]
        deq_wins = [m for m, win in best_large.get(key, []) if win]
        print(f"  {key[0]}x{key[1]}: int4 op beats a cached bf16 weight at M in {op_wins}; "
              f"dequantize+matmul beats the int4 op at M in {deq_wins}")
        if key in best_native:
            print(f"  {key[0]}x{key[1]}: our kernel beats a cached bf16 weight at M in {[m for m, win in best_native[key] if win]}")


def bench_inductor_gemv(cfg: Config) -> None:
    """Can a torch.compile-generated kernel beat torch's int4 op at M = 1 (the op reaches about half the bandwidth)?

    Weight layout chosen for the compiler: bytes [K // G, G // 2, N], low nibble row j of the group, high nibble row
    j + G / 2, so unpacking needs no cross-lane shuffles and the reduction over K vectorizes along N. Four partial sums
    over quarter groups give the generated loop four independent accumulators. Same math as the op, fp32 throughout.
    """
    print("\nM = 1: inductor-generated GEMV (fp32) vs torch's int4 op (bf16), ms and GB/s of packed weight")
    for shape in cfg.shapes:
        for K, N, G in SHAPES[shape]:
            H, C = G // 2, 4
            q = torch.randint(0, 16, (K // G, G, N), dtype=torch.uint8)
            wq = (q[:, :H] | (q[:, H:] << 4)).contiguous()  # [K // G, G // 2, N]
            scale, zero = torch.rand(K // G, N), torch.rand(K // G, N)  # W = q * scale + zero per group

            def gemv(x, wq, scale, zero):
                xg = x.view(K // G, G)
                w4 = wq.view(K // G, C, H // C, N)
                xl, xh = xg[:, :H].reshape(K // G, C, H // C, 1), xg[:, H:].reshape(K // G, C, H // C, 1)
                lo, hi = (w4 & 15).float(), (w4 >> 4).float()
                parts = [(lo[:, c] * xl[:, c] + hi[:, c] * xh[:, c]).sum(1) for c in range(C)]
                t = parts[0] + parts[1] + parts[2] + parts[3]  # [K // G, N]
                return (t * scale + zero * xg.sum(-1, keepdim=True)).sum(0)

            torch._dynamo.reset()  # one compiled kernel per shape, without hitting dynamo's recompile limit
            compiled = torch.compile(gemv, dynamic=False)
            x = torch.randn(1, K)
            w = prepare(*random_packed(K, N, G, "cpu"), G)
            xb = x.bfloat16()
            t = cpu_time({"inductor": lambda: compiled(x, wq, scale, zero), "op": lambda: cpu.int4pack_linear(xb, w.int4pack)}, cfg.rounds)
            nbytes = K * N // 2
            print(f"  {K:>5}x{N:<6} inductor {t['inductor'] * 1e3:7.3f} ms {nbytes / t['inductor'] / 1e9:5.1f} GB/s | "
                  f"int4 op {t['op'] * 1e3:7.3f} ms {nbytes / t['op'] / 1e9:5.1f} GB/s", flush=True)


# ---------------------------------------------------------------------------------------------------- CUDA

def bench_cuda(cfg: Config) -> None:
    import triton.testing

    from tinyserve_kernels.dequant import dequantize_triton
    from tinyserve_kernels.gemm import choose_split_k as gemm_split_k, int4_gemm
    from tinyserve_kernels.gemv import GEMV_MAX_M, choose_split_k as gemv_split_k, int4_gemv

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    a = torch.empty(2**30 // 2, dtype=torch.float16, device=dev)
    b = torch.empty_like(a)
    copy_bw = 2 * a.nbytes / (triton.testing.do_bench(lambda: b.copy_(a)) * 1e-3) / 1e9
    del a, b
    print(f"CUDA {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}; measured copy {copy_bw:.0f} GB/s (read + write)")
    print(f"{'shape KxN':>12} {'G':>4} {'M':>5} | {'gemv':>8} {'gemm':>8} {'deq+mm':>8} | {'chosen':>14} {'GB/s':>6} {'%copy':>6} | {'fp16':>8} {'x fp16':>7}")
    for shape in cfg.shapes:
        for K, N, G in SHAPES[shape]:
            qw, qz, s = random_packed(K, N, G, "cuda")
            w16 = torch.randn(K, N, dtype=torch.float16, device=dev)
            w = dispatch.prepare(qw, qz, s, G)
            for M in cfg.m:
                if cfg.quick and M > 256:
                    continue
                x = torch.randn(M, K, dtype=torch.float16, device=dev)
                sms = props.multi_processor_count
                t = {
                    "gemm": triton.testing.do_bench(lambda: int4_gemm(x, qw, qz, s, G, split_k=gemm_split_k(M, N, K, 64, 128, min(G, 64), sms))),
                    "deq+mm": triton.testing.do_bench(lambda: x @ dequantize_triton(qw, qz, s, G, x.dtype)),
                    "fp16": triton.testing.do_bench(lambda: x @ w16),
                    "chosen": triton.testing.do_bench(lambda: dispatch.int4_linear(x, w)),
                }
                if M <= GEMV_MAX_M:
                    t["gemv"] = triton.testing.do_bench(lambda: int4_gemv(x, qw, qz, s, G, split_k=gemv_split_k(N, K, G, sms)))
                gbs = (int4_bytes(K, N, G) + M * K * 2) / (t["chosen"] * 1e-3) / 1e9
                print(
                    f"{K:>5}x{N:<6} {G:>4} {M:>5} | {t.get('gemv', float('nan')):8.4f} {t['gemm']:8.4f} {t['deq+mm']:8.4f} | "
                    f"{choose_path('cuda', M, group_size=G):>14} {gbs:6.0f} {100 * gbs / copy_bw:5.0f}% | {t['fp16']:8.4f} {t['fp16'] / t['chosen']:7.2f}",
                    flush=True,
                )


def main(cfg: Config) -> None:
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.quick:
        cfg.shapes = [s for s in cfg.shapes if s == "smollm2"] + [s for s in cfg.shapes if s != "smollm2"][:1]
    if device == "cuda":
        bench_cuda(cfg)
        return
    bench_cpu(cfg)
    if cfg.try_inductor_gemv:
        bench_inductor_gemv(cfg)


def parse_args() -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--m", nargs="+", type=int, default=M_LIST)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per case (CPU)")
    p.add_argument("--working-set-mib", type=int, default=512, help="weight copies cycled per path to defeat caches (CPU)")
    p.add_argument("--quick", action="store_true", help="SmolLM2 and one 7B shape, M <= 256")
    p.add_argument("--try-inductor-gemv", action="store_true", help="CPU M=1: also time an inductor-generated INT4 GEMV")
    p.add_argument("--native-variant", choices=list(cpu_native.VARIANTS), default="native",
                   help="CPU: which build of our kernel to time (avx512bf16 shows a CPU without AMX on one with it)")
    a = p.parse_args()
    return Config(a.shapes, a.m, a.device, a.threads, a.rounds, a.working_set_mib, a.quick, a.try_inductor_gemv, a.native_variant)


if __name__ == "__main__":
    main(parse_args())
