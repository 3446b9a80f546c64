"""Batched decode-step time on CPU: which backend x batch_invariant on/off x rows per step, in one run.

    python scripts/bench_decode_step.py                    # the default model, M = 1 and 16, 1 thread (as serve)
    python scripts/bench_decode_step.py --m 1 4 16 --threads 2 --profile

One ModelRunner per (backend, batch_invariant) on the embedded default model (AWQ INT4), 16 slots each holding a
100-token prompt. The backend is chosen at load time (tinyserve/runtime/backends/, plan) from TINYSERVE_CPU_KERNEL, which this
script sets before each runner is built and restores after: "cpu-native" (TINYSERVE_CPU_KERNEL=auto, the runtime's
default on CPU: the whole step in one C++ call around our kernels, tinyserve/runtime/backends/cpu_native.py; skipped with a
message where tinyserve.runtime.backends.cpu_kernels_usable("auto") is false, i.e. no AMX or AVX512-BF16 engine) and "eager"
(TINYSERVE_CPU_KERNEL=0: the reference forward with torch's int4 op and int8 op, tinyserve/runtime/backends/eager.py).
Every round times each (runner, M) in turn, 3 steps of M rows at position 100, then the lm_head alone at each M: ours
(NativeInt8Linear) and torch's `_weight_int8pack_mm` (eager Int8Linear) on the same int8 codes and scales, quantized
from the model's lm_head weight (tied to the embeddings); each row reports its best round (the shared VM's neighbours
slow some rounds). --profile adds torch's profiler table of a 16-row step through the eager backend with
batch_invariant on (the cpu-native step is one opaque C++ call).
"""

import argparse
import os
import time
from contextlib import contextmanager

import torch

CPU_KERNEL_ENV = "TINYSERVE_CPU_KERNEL"  # read by tinyserve.runtime.backends.plan when a runner is built


@contextmanager
def cpu_kernel_env(value: str):
    """TINYSERVE_CPU_KERNEL=value while a runner is built (plan reads it at load), the previous value restored after."""
    old = os.environ.get(CPU_KERNEL_ENV)
    os.environ[CPU_KERNEL_ENV] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(CPU_KERNEL_ENV, None)
        else:
            os.environ[CPU_KERNEL_ENV] = old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", nargs="+", type=int, default=[1, 16], help="rows per decode step (at most 16)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    if not all(1 <= M <= 16 for M in a.m):
        ap.error("--m: rows per step must be 1..16 (the runners have 16 slots)")
    torch.set_num_threads(a.threads)

    from tinyserve.runtime.backends import cpu_kernels_usable
    from tinyserve.runtime.backends.cpu_native import NativeInt8Linear
    from tinyserve.runtime.backends.eager import Int8Linear
    from tinyserve.cli.default_model import default_folder
    from tinyserve.runtime.runner import ModelRunner, RunnerConfig
    from tinyserve_kernels import cpu, cpu_native

    folder = default_folder("quantized")
    runners = {}
    for backend, env in (("cpu-native", "auto"), ("eager", "0")):
        if backend == "cpu-native" and not cpu_kernels_usable("auto"):
            print("our CPU kernels are not used on this CPU (no AMX or AVX512-BF16 engine): cpu-native rows skipped")
            continue
        for invariant in (True, False):
            with cpu_kernel_env(env):
                r = ModelRunner(folder, RunnerConfig(device="cpu", num_slots=16, max_seq_len=512, batch_invariant=invariant, threads=a.threads))
            if r.backend.name != backend:
                print(f"TINYSERVE_CPU_KERNEL={env} planned the {r.backend.name} backend, not {backend}, for this model: row skipped")
                continue
            slots = [r.alloc_slot() for _ in range(16)]
            g = torch.Generator().manual_seed(0)
            for s in slots:
                r.prefill(s, torch.randint(0, r.cfg.vocab_size, (100,), generator=g).tolist())
            runners[(backend, invariant)] = (r, slots)
    if not runners:
        raise SystemExit("no runner was built")

    # The lm_head alone: ours and torch's op on the same int8 codes and scales (scales rounded to bf16, as the
    # backends give them), x [M, hidden] bf16.
    r0 = next(iter(runners.values()))[0]
    if not r0.cfg.tie_word_embeddings:
        raise SystemExit("the default model's lm_head is expected to be tied to its embeddings")
    q, s = cpu.quantize_int8_rows(r0.weights.embed)
    heads = {"aten": Int8Linear(q, s.to(torch.bfloat16))}
    if any(backend == "cpu-native" for backend, _ in runners):
        heads = {"ours": NativeInt8Linear(cpu_native.repack_int8(q, s.to(torch.bfloat16))), **heads}
    H = r0.cfg.hidden_size
    xs = {M: torch.randn(M, H, generator=torch.Generator().manual_seed(M)).bfloat16() for M in a.m}

    best: dict[tuple, float] = {}
    for _ in range(a.rounds):
        for key, (r, slots) in runners.items():
            for M in a.m:
                t0 = time.perf_counter()
                for _ in range(3):
                    r.decode(slots[:M], [1] * M, positions=[100] * M)
                t = (time.perf_counter() - t0) / 3
                best[(*key, M)] = min(best.get((*key, M), t), t)
        for name, head in heads.items():
            for M in a.m:
                t0 = time.perf_counter()
                with torch.inference_mode():
                    for _ in range(3):
                        head(xs[M])
                t = (time.perf_counter() - t0) / 3
                best[("lm_head", name, M)] = min(best.get(("lm_head", name, M), t), t)
    print(f"{a.threads} thread(s), load average {os.getloadavg()[0]:.1f}; ms per decode step, best of {a.rounds} interleaved rounds")
    for key, t in best.items():
        if key[0] != "lm_head":
            backend, invariant, M = key
            print(f"{backend:10s} batch_invariant={invariant!s:5s} M={M:3d}: {t * 1e3:7.1f} ms {M / t:7.1f} tok/s")
    for key, t in best.items():
        if key[0] == "lm_head":
            _, name, M = key
            w = heads[name]
            print(f"lm_head {name:4s} M={M:3d}: {t * 1e3:7.2f} ms {w.nbytes / t / 1e9:5.1f} GB/s of int8 weights")

    if a.profile and ("eager", True) in runners:
        from torch.profiler import ProfilerActivity, profile

        r, slots = runners[("eager", True)]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                r.decode(slots, [1] * 16, positions=[100] * 16)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
