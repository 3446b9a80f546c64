"""Batched decode-step time on CPU: which INT4 kernel x batch_invariant on/off x rows per step, in one run.

    python scripts/bench_decode_step.py                    # the default model, M = 1 and 16, 1 thread (as serve)
    python scripts/bench_decode_step.py --m 1 4 16 --threads 2 --profile

One runner per (kernel, batch_invariant) on the embedded default model (AWQ INT4), 16 slots each holding a 100-token
prompt; "native" is our kernel (kernels/cpu_native.py, where kernels.cpu_native.use_by_default() holds, else the row is
skipped), "int4pack" torch's int4 op (TINYSERVE_CPU_KERNEL=0). Every round times each (runner, M) in turn, 3 steps of
M rows at position 100; each row reports its best round (the shared VM's neighbours slow some rounds). --profile adds
torch's profiler table of a 16-row step with our kernel and batch_invariant on (the server's setting).
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

    from kernels import cpu_native
    from quantize.default_model import ensure_awq_default
    from tinyserve.runner import ModelRunner, RunnerConfig

    folder = ensure_awq_default()
    runners = {}
    for kernel in ("native", "int4pack"):
        os.environ[cpu_native.ENV_SWITCH] = "auto" if kernel == "native" else "0"
        if kernel == "native" and not cpu_native.use_by_default():
            print("our kernel is not used on this CPU (no AMX engine): native rows skipped")
            continue
        for invariant in (True, False):
            r = ModelRunner(folder, RunnerConfig(device="cpu", num_slots=16, max_seq_len=512, batch_invariant=invariant, threads=a.threads))
            slots = [r.alloc_slot() for _ in range(16)]
            g = torch.Generator().manual_seed(0)
            for s in slots:
                r.prefill(s, torch.randint(0, r.cfg.vocab_size, (100,), generator=g).tolist())
            runners[(kernel, invariant)] = (r, slots)
    os.environ.pop(cpu_native.ENV_SWITCH)

    best: dict[tuple, float] = {}
    for _ in range(a.rounds):
        for key, (r, slots) in runners.items():
            for M in a.m:
                t0 = time.perf_counter()
                for _ in range(3):
                    r.decode(slots[:M], [1] * M, positions=[100] * M)
                t = (time.perf_counter() - t0) / 3
                best[(*key, M)] = min(best.get((*key, M), t), t)
    print(f"{a.threads} thread(s), load average {os.getloadavg()[0]:.1f}; ms per decode step, best of {a.rounds} interleaved rounds")
    for (kernel, invariant, M), t in best.items():
        print(f"{kernel:9s} batch_invariant={invariant!s:5s} M={M:3d}: {t * 1e3:7.1f} ms {M / t:7.1f} tok/s")

    if a.profile and ("native", True) in runners:
        from torch.profiler import ProfilerActivity, profile

        r, slots = runners[("native", True)]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                r.decode(slots, [1] * 16, positions=[100] * 16)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
