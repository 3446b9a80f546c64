"""Batched decode-step time on CPU: which kernels x batch_invariant on/off x rows per step, in one run.

    python scripts/bench_decode_step.py                    # the default model, M = 1 and 16, 1 thread (as serve)
    python scripts/bench_decode_step.py --m 1 4 16 --threads 2 --profile

One runner per (kernels, batch_invariant) on the embedded default model (AWQ INT4), 16 slots each holding a 100-token
prompt; "fused" is the runtime's default on CPU (the whole step in one C++ call, tinyserve/fused_step.py, around our
kernels), "native" the same kernels for the INT4 linears, the int8 lm_head and attention called from model.decode
(tinyserve_kernels/cpu_native.py; both rows need tinyserve_kernels.cpu_native.use_by_default(), else they are skipped), "native+aten"
that with torch's `_weight_int8pack_mm` for the lm_head (same codes and scales: the runtime before our int8 kernel),
"int4pack" torch's int4 op and int8 op (TINYSERVE_CPU_KERNEL=0). Every round times each (runner, M) in turn, 3 steps of M rows at
position 100, then the lm_head alone (ours, torch's op) at each M; each row reports its best round (the shared VM's
neighbours slow some rounds). --profile adds torch's profiler table of a 16-row step through model.decode with our
kernels and batch_invariant on (the "native" row; the fused step is one opaque call).
"""

import argparse
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", nargs="+", type=int, default=[1, 16], help="rows per decode step (at most 16)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from dataclasses import replace

    from tinyserve_kernels import cpu_native
    from tinyserve_quantize.default_model import ensure_quantized_default
    from tinyserve.model import Int8Linear
    from tinyserve.runner import ModelRunner, RunnerConfig

    folder = ensure_quantized_default()
    runners = {}
    for kernel in ("fused", "native", "native+aten", "int4pack"):
        os.environ[cpu_native.ENV_SWITCH] = "0" if kernel == "int4pack" else "auto"
        if kernel != "int4pack" and not cpu_native.use_by_default():
            print(f"our kernels are not used on this CPU (no AMX or AVX512-BF16 engine): {kernel} rows skipped")
            continue
        for invariant in (True, False):
            r = ModelRunner(folder, RunnerConfig(device="cpu", num_slots=16, max_seq_len=512, batch_invariant=invariant, threads=a.threads))
            if kernel != "fused":
                r.fused = None  # decode through model.decode
            if kernel == "native+aten":  # the same int8 codes and scales, through torch's op
                q, scales = cpu_native.unpack_int8(r.weights.lm_head.native)
                r.weights = replace(r.weights, lm_head=Int8Linear(q, scales.to(r.dtype)))
            slots = [r.alloc_slot() for _ in range(16)]
            g = torch.Generator().manual_seed(0)
            for s in slots:
                r.prefill(s, torch.randint(0, r.cfg.vocab_size, (100,), generator=g).tolist())
            runners[(kernel, invariant)] = (r, slots)
    os.environ.pop(cpu_native.ENV_SWITCH)
    heads = {}  # the lm_head alone: ours and torch's op on the same codes, x [M, hidden] bf16
    if ("native", True) in runners and ("native+aten", True) in runners:
        heads = {"ours": runners[("native", True)][0].weights.lm_head, "aten": runners[("native+aten", True)][0].weights.lm_head}
    H = next(iter(runners.values()))[0].cfg.hidden_size
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
            kernel, invariant, M = key
            print(f"{kernel:11s} batch_invariant={invariant!s:5s} M={M:3d}: {t * 1e3:7.1f} ms {M / t:7.1f} tok/s")
    for key, t in best.items():
        if key[0] == "lm_head":
            _, name, M = key
            w = heads[name]
            print(f"lm_head {name:4s} M={M:3d}: {t * 1e3:7.2f} ms {w.nbytes / t / 1e9:5.1f} GB/s of int8 weights")

    if a.profile and ("native", True) in runners:
        from torch.profiler import ProfilerActivity, profile

        r, slots = runners[("native", True)]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                r.decode(slots, [1] * 16, positions=[100] * 16)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
